#![forbid(unsafe_code)]

fn main() {
    std::process::exit(wxsidecar::cli::main());
}
