//! The module graph stays a DAG and follows the layers in ARCHITECTURE.md:
//! read from the `crate::` paths in `src/` (comments and `#[cfg(test)]`
//! parts left out), so a new edge that climbs a layer or closes a cycle
//! fails here, with the edges that do it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level module → the top-level modules it names.
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let deps = graph.entry(top.clone()).or_default();
            for line in product_lines(&text) {
                for used in crate_paths(line) {
                    if used != top {
                        deps.insert(used);
                    }
                }
            }
        }
    }
    graph
}

/// The lines of `text` that are product code: comments and every
/// `#[cfg(test)]` item (counted by braces) left out.
fn product_lines(text: &str) -> Vec<&str> {
    let (mut out, mut skipping, mut depth) = (Vec::new(), false, 0i32);
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            skipping = true;
            depth = 0;
            continue;
        }
        if skipping {
            depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if depth <= 0 && (line.contains('}') || t.ends_with(';')) {
                skipping = false;
            }
            continue;
        }
        out.push(line);
    }
    out
}

/// The modules a line names as `crate::m` or inside `crate::{m, n::x}`.
fn crate_paths(line: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in line.match_indices("crate::") {
        let rest = &line[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names: each comma-separated part at depth 0.
            let (mut depth, mut part) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(part.trim()));
                        part.clear();
                        continue;
                    }
                    _ => {}
                }
                part.push(c);
            }
            out.push(ident(part.trim()));
            out.retain(|n| !n.is_empty());
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// Every cycle's modules (strongly connected components of two or more).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then walk the reversed graph.
    fn visit(g: &Graph, v: &str, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(v.to_string()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            if g.contains_key(w) {
                visit(g, w, seen, out);
            }
        }
        out.push(v.to_string());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for v in graph.keys() {
        visit(graph, v, &mut seen, &mut order);
    }
    let mut reversed = Graph::new();
    for (v, ws) in graph {
        reversed.entry(v.clone()).or_default();
        for w in ws.iter().filter(|w| graph.contains_key(*w)) {
            reversed.entry(w.clone()).or_default().insert(v.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for v in order.iter().rev() {
        let mut comp = Vec::new();
        visit(&reversed, v, &mut seen, &mut comp);
        if comp.len() > 1 {
            comp.sort();
            found.push(comp);
        }
    }
    found
}

/// module → layer, from ARCHITECTURE.md's "Who may import whom" table.
fn layers(architecture: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for line in architecture.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(layer) = cells.get(1).and_then(|c| c.parse::<u32>().ok()) else {
            continue;
        };
        for module in cells[3].split(',') {
            out.insert(module.trim().trim_matches('`').to_string(), layer);
        }
    }
    out
}

#[test]
fn the_modules_form_a_dag_that_follows_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let graph = module_graph(&root.join("src"));
    assert!(graph.len() > 20, "read the modules: {graph:?}");
    let cyc = cycles(&graph);
    assert!(cyc.is_empty(), "module cycles: {cyc:?}");
    let layer = layers(&std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap());
    let mut problems = Vec::new();
    for (module, deps) in &graph {
        let Some(&l) = layer.get(module) else {
            problems.push(format!("{module} is not in ARCHITECTURE.md's layer table"));
            continue;
        };
        for dep in deps.iter().filter(|d| graph.contains_key(*d)) {
            match layer.get(dep) {
                Some(&d) if d > l => problems.push(format!(
                    "{module} (layer {l}) uses {dep} (layer {d}): an edge up the layers"
                )),
                _ => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_finds_a_cycle_and_an_edge_up() {
    let mut g = Graph::new();
    let edge = |g: &mut Graph, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    };
    edge(&mut g, "config", "secret");
    edge(&mut g, "token", "config");
    assert!(cycles(&g).is_empty());
    edge(&mut g, "config", "token");
    assert_eq!(
        cycles(&g),
        [vec!["config".to_string(), "token".to_string()]]
    );
    let text = "use crate::a::X;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n    fn f() {}\n}\n// crate::c\nfn g() { crate::d::h() }\n";
    let lines = product_lines(text);
    assert_eq!(lines, ["use crate::a::X;", "fn g() { crate::d::h() }"]);
    assert_eq!(
        crate_paths("use crate::{demo, server::{x, y}, a}; crate::lease::Cell"),
        ["demo", "server", "a", "lease"]
    );
}

/// The crates follow ARCHITECTURE.md's crate table: each depends only on
/// crates listed before it (read from its Cargo.toml's path dependencies).
#[test]
fn each_crate_depends_only_on_crates_below_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let order: Vec<(String, String)> = architecture
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells
                .get(1)?
                .strip_prefix("`wxsidecar")?
                .trim_end_matches('`');
            let path = cells.get(2)?.trim_matches('`');
            Some((format!("wxsidecar{name}"), path.to_string()))
        })
        .collect();
    assert!(order.len() >= 4, "the crate table: {order:?}");
    for (i, (name, path)) in order.iter().enumerate() {
        let manifest = match path.as_str() {
            "src/" => root.join("Cargo.toml"),
            p => root.join(p).join("Cargo.toml"),
        };
        let text = std::fs::read_to_string(&manifest).unwrap();
        for (dep, _) in order.iter().skip(i) {
            let uses = text
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{dep} =")));
            assert!(!uses, "{name} depends on {dep}, listed after it");
        }
    }
}
