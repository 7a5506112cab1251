//! Where a configuration's `${VAR}` values and `*_file` contents come from:
//! the process environment and file system when the sidecar runs, a map in
//! tests — which therefore never touch the process environment
//! (`std::env::set_var` is banned in `.clippy.toml`).
//!
//! Checking stays a function of the text and its sources: [`with`] makes
//! `sources` the ones [`var`] and [`file`] read for the length of one parse,
//! on this thread only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Environment variables and files, as the configuration sees them.
pub trait Sources: Send + Sync {
    fn var(&self, name: &str) -> Option<String>;
    fn file(&self, path: &str) -> std::io::Result<String>;
}

/// The process's own environment and file system.
pub struct System;

impl Sources for System {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn file(&self, path: &str) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// Fixed variables and files (tests); anything else is absent.
#[derive(Default, Clone)]
pub struct Fixed {
    pub vars: HashMap<String, String>,
    pub files: HashMap<String, String>,
}

impl Sources for Fixed {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    fn file(&self, path: &str) -> std::io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
    }
}

/// The process's sources, noting each file read (what a reload watches).
#[derive(Default)]
pub struct Recording {
    read: parking_lot::Mutex<Vec<String>>,
}

impl Recording {
    pub fn files(&self) -> Vec<String> {
        self.read.lock().clone()
    }
}

impl Sources for Recording {
    fn var(&self, name: &str) -> Option<String> {
        System.var(name)
    }

    fn file(&self, path: &str) -> std::io::Result<String> {
        self.read.lock().push(path.to_string());
        System.file(path)
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<dyn Sources>>> = const { RefCell::new(None) };
}

/// Runs `f` with `sources` as the ones [`var`] and [`file`] read.
pub fn with<T>(sources: Arc<dyn Sources>, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Arc<dyn Sources>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with_borrow_mut(|c| *c = self.0.take());
        }
    }
    let _reset = Reset(CURRENT.with_borrow_mut(|c| c.replace(sources)));
    f()
}

fn current() -> Arc<dyn Sources> {
    CURRENT
        .with_borrow(|c| c.clone())
        .unwrap_or_else(|| Arc::new(System))
}

/// An environment variable of the current sources.
pub fn var(name: &str) -> Option<String> {
    current().var(name)
}

/// What a file held, as a number: two reads of it compare equal when its
/// content did not change (the reload watch, a rotated `ca_file`).
pub fn digest(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// A file's text from the current sources.
pub fn file(path: impl AsRef<std::path::Path>) -> std::io::Result<String> {
    current().file(&path.as_ref().to_string_lossy())
}
