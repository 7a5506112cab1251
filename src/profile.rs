//! CPU profiles on demand (`GET /debug/pprof/profile?seconds=N`, admin
//! listener): pprof protobuf for `go tool pprof`, or `?format=flamegraph`
//! for an SVG. Sampling runs only while a profile is being taken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Samples per second: the usual prime, to avoid lockstep with timers.
const DEFAULT_FREQUENCY: i32 = 99;
/// Longest profile accepted.
pub const MAX_SECONDS: u64 = 60;

static BUSY: AtomicBool = AtomicBool::new(false);

/// Takes a CPU profile of this process for `seconds`; returns the content
/// type and the bytes.
pub async fn cpu(seconds: u64, flamegraph: bool) -> Result<(&'static str, Vec<u8>), String> {
    if BUSY.swap(true, Ordering::AcqRel) {
        return Err("a profile is already being taken".into());
    }
    let result = tokio::task::spawn_blocking(move || {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(DEFAULT_FREQUENCY)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| format!("cannot start the profiler: {e}"))?;
        std::thread::sleep(Duration::from_secs(seconds));
        let report = guard
            .report()
            .build()
            .map_err(|e| format!("cannot build the report: {e}"))?;
        if flamegraph {
            let mut svg = Vec::new();
            report
                .flamegraph(&mut svg)
                .map_err(|e| format!("cannot draw the flamegraph: {e}"))?;
            Ok(("image/svg+xml", svg))
        } else {
            use pprof::protos::Message;
            let profile = report.pprof().map_err(|e| format!("cannot encode: {e}"))?;
            Ok(("application/octet-stream", profile.encode_to_vec()))
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("profiler task failed: {e}")));
    BUSY.store(false, Ordering::Release);
    result
}
