#![forbid(unsafe_code)]

/// jemalloc, not glibc's malloc: with glibc, the memory of 10,000 closed
/// connections stayed with the process for good (per-thread arenas keep
/// freed chunks in the middle of their heaps); jemalloc's background thread
/// hands unused pages back after its decay time (turned on in `main`),
/// so a burst of connections is not paid for in RSS ever after. mimalloc
/// was tried too: it returns pages only when the thread that freed them
/// allocates again, so an idle sidecar kept the burst. Measured in
/// BENCHMARKS.md ("Connections").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    // Unused pages go back to the system from a background thread, even
    // while the process is idle (see GLOBAL).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("wxsidecar: jemalloc background thread not started: {e}");
    }
    std::process::exit(wxsidecar::cli::main());
}
