//! Keeps the store's modules from importing each other in circles (issue 10).
//!
//! A circle makes every module in it depend on all the others, so none can be read,
//! moved or split alone. `site.rs` is the base the others build on; leaves such as
//! `stored_json`, `types` and `error` import nothing from the store. This test reads
//! the sources as text rather than asking the compiler, which has no notion of a
//! module dependency within a crate.
//!
//! An edge is any `crate::m` path, in `use` lines or in bodies (`crate::{m::x, ..}`
//! groups too); a name re-exported at the root (`crate::Site`) counts as an edge to
//! the module that defines it. The root itself is no node: it re-exports everything,
//! and what it defines (`Store`, `in_txn!`, `Cached`) depends on no module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The source without comments and string or char literals, so SQL text and prose
/// that mention `crate::` are not read as paths.
fn code_only(src: &str) -> String {
    let s: Vec<char> = src.chars().collect();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let at = |k: usize| s.get(k).copied().unwrap_or('\0');
    while i < s.len() {
        if s[i] == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if s[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if s[i] == 'r'
            && (i == 0 || !ident(s[i - 1]) || (s[i - 1] == 'b' && (i < 2 || !ident(s[i - 2]))))
            && matches!(at(i + 1), '"' | '#')
        {
            let mut hashes = 0;
            let mut j = i + 1;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                out.push(s[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < s.len() && !(s[j] == '"' && (1..=hashes).all(|h| at(j + h) == '#')) {
                j += 1;
            }
            i = j + 1 + hashes;
        } else if s[i] == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if s[i] == '\'' && at(i + 1) == '\\' {
            i += 2;
            while i < s.len() && s[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if s[i] == '\'' && at(i + 2) == '\'' {
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// The identifier `s` starts with (empty when none).
fn leading_ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first name of every path that follows `crate::`: `crate::site::x` gives
/// `site`, `crate::{site::x, Store}` gives `site` and `Store`.
fn crate_path_heads(code: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // Another crate whose name ends in `crate` is no path into this one.
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            heads.push(leading_ident(rest));
            continue;
        };
        let (mut depth, mut start) = (0usize, 0);
        for (k, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    heads.push(leading_ident(group[start..k].trim()));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    heads.push(leading_ident(group[start..k].trim()));
                    start = k + 1;
                }
                _ => {}
            }
        }
    }
    heads.retain(|h| !h.is_empty());
    heads
}

/// The words that may precede an item's name in its declaration.
const ITEM_WORDS: [&str; 12] = [
    "async", "unsafe", "extern", "const", "fn", "struct", "enum", "static", "type", "trait",
    "union", "mod",
];

/// Which module defines each name the root re-exports (`pub use m::{A, B}`,
/// `pub use m::A`, and for `pub use m::*` every top-level `pub` item of `m`).
fn reexports(lib: &str, sources: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut owner = BTreeMap::new();
    for (at, _) in lib.match_indices("pub use ") {
        let rest = &lib[at + "pub use ".len()..];
        let Some(end) = rest.find(';') else { continue };
        let Some((module, names)) = rest[..end].split_once("::") else {
            continue;
        };
        if !sources.contains_key(module) {
            continue;
        }
        if names.trim() == "*" {
            for line in sources[module].lines() {
                let Some(item) = line
                    .strip_prefix("pub ")
                    .or_else(|| line.strip_prefix("pub(crate) "))
                else {
                    continue;
                };
                // The name is the first word after the item's kind and qualifiers.
                let name = item.split_whitespace().find(|w| !ITEM_WORDS.contains(w));
                if let Some(name) = name {
                    owner.insert(leading_ident(name).to_owned(), module.to_owned());
                }
            }
        } else {
            for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
                let name = leading_ident(name.trim());
                if !name.is_empty() {
                    owner.insert(name.to_owned(), module.to_owned());
                }
            }
        }
    }
    owner
}

/// The store's module graph, read from its sources.
fn store_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("read src") {
        let path = entry.expect("src entry").path();
        assert!(
            !path.is_dir(),
            "{} is a directory: this test reads only src/*.rs, teach it nested modules",
            path.display()
        );
        if path.extension().is_some_and(|e| e == "rs") {
            let stem = path.file_stem().expect("file name").to_string_lossy();
            let text = std::fs::read_to_string(&path).expect("read source");
            sources.insert(stem.into_owned(), code_only(&text));
        }
    }
    let lib = sources.remove("lib").expect("lib.rs");
    let owner = reexports(&lib, &sources);
    let mut graph = Graph::new();
    for (module, code) in &sources {
        let deps = crate_path_heads(code)
            .into_iter()
            .filter_map(|head| {
                if sources.contains_key(head) {
                    Some(head.to_owned())
                } else {
                    owner.get(head).cloned()
                }
            })
            .filter(|dep| dep != module)
            .collect();
        graph.insert(module.clone(), deps);
    }
    graph
}

/// A circle in `graph` as the path that closes it (`a -> b -> a`), if there is one.
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(k) = path.iter().position(|p| p == node) {
            let mut circle = path[k..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, done, path) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn store_modules_import_each_other_in_no_circle() {
    let graph = store_graph();
    // A reader that silently found nothing would pass; site is the base, so it is used.
    assert!(
        graph.values().any(|deps| deps.contains("site")),
        "no module seen importing site: the source reader is broken, {graph:?}"
    );
    if let Some(circle) = find_circle(&graph) {
        panic!(
            "store modules import each other in a circle: {}; move what the lower \
             module needs down (a leaf such as stored_json, or keyplane-core)",
            circle.join(" -> ")
        );
    }
}

#[test]
fn the_reader_sees_paths_in_bodies_and_groups_but_not_in_text() {
    let code = code_only(
        r##"use crate::{site::{a, b}, Site};
        // crate::observed in a comment
        let q = "SELECT 'crate::status'"; let r = r#"crate::rules"#; let c = '"';
        fn f() { crate::device::get(); }"##,
    );
    assert_eq!(crate_path_heads(&code), ["site", "Site", "device"]);
    let graph: Graph = [("a", "b"), ("b", "c"), ("c", "a")]
        .into_iter()
        .map(|(m, d)| (m.to_owned(), BTreeSet::from([d.to_owned()])))
        .collect();
    assert_eq!(
        find_circle(&graph).map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_owned())
    );
}
