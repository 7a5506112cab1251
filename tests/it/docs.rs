//! The docs a user reads stay findable and true: the README is short and
//! maps every page of `docs/`, every link between them lands on a file and
//! a heading that exist, and the README's minimal config is the one in
//! `conf/` and passes `check`.

use std::path::{Path, PathBuf};

use crate::support::BIN;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pages: README, ARCHITECTURE and every `docs/*.md`.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-`
/// and `_` dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a page's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            !fenced && l.starts_with('#')
        })
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The targets of a page's Markdown links `[text](target)` (outside code).
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_link_lands_on_a_page_and_heading_that_exist() {
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let file: &Path = if file.is_empty() {
                &page
            } else {
                &page.parent().unwrap().join(file)
            };
            assert!(
                file.exists(),
                "{}: link to `{target}`: no such file",
                page.display()
            );
            if let Some(a) = anchor {
                let there = std::fs::read_to_string(file).unwrap();
                assert!(
                    anchors(&there).iter().any(|h| h == a),
                    "{}: link to `{target}`: no such heading (has {:?})",
                    page.display(),
                    anchors(&there)
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "links checked: {checked}");
}

#[test]
fn the_readme_is_short_and_maps_every_page_of_docs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.lines().count() <= 200,
        "README.md has {} lines; move detail to docs/",
        readme.lines().count()
    );
    for heading in [
        "## Two commands",
        "## Point an app at it",
        "## A minimal config",
        "## Documentation",
    ] {
        assert!(readme.contains(heading), "README lacks `{heading}`");
    }
    let linked = links(&readme);
    for page in pages()
        .iter()
        .filter(|p| p.parent().unwrap().ends_with("docs"))
    {
        let name = format!("docs/{}", page.file_name().unwrap().to_string_lossy());
        assert!(
            linked
                .iter()
                .any(|l| l.split('#').next() == Some(name.as_str())),
            "README's map does not link {name}"
        );
    }
}

#[test]
fn the_readmes_minimal_config_is_conf_minimal_and_passes_check() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a yaml block in the README");
    let file = std::fs::read_to_string(root().join("conf/minimal.yaml")).unwrap();
    assert_eq!(
        block, file,
        "README's minimal config and conf/minimal.yaml differ"
    );
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(root().join("conf/minimal.yaml"))
        .env("SHOP_SECRET", "minimal-config-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("minimal-config-secret"), "{stdout}");
}

/// docs/configuration.md is what `wxsidecar check --reference` prints
/// from the key table (crates/config/src/keys.rs): `make docs` writes it.
#[test]
fn the_configuration_reference_is_generated_and_current() {
    let out = std::process::Command::new(BIN)
        .args(["check", "--reference"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    assert!(
        page == generated,
        "docs/configuration.md is stale: run `make docs` (it is generated from crates/config/src/keys.rs)"
    );
    for key in [
        "limits.send_timeout",
        "upstream.answer_timeout",
        "accounts[].secret",
        "platforms[].callback_max_age",
    ] {
        assert!(
            page.contains(&format!("| `{key}` |")),
            "{key} in the reference"
        );
    }
}
