//! The module map in `src/lib.rs` names every module: each file or folder
//! under `src/` (a top-level module) must appear as ``[`name`]`` (the
//! binary's own modules, declared in `main.rs`, as `` `name` ``), and each
//! module file below, at any depth, as `` `name` `` somewhere in the map or
//! in its folder's `mod.rs` docs. A module added without a line fails here.

use std::fs;
use std::path::Path;

fn modules(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if p.join("mod.rs").exists() {
                out.push(name);
            }
        } else if p.extension().is_some_and(|x| x == "rs")
            && !matches!(name.as_str(), "lib" | "main" | "mod" | "tests")
        {
            out.push(name);
        }
    }
    out.sort();
    out
}

fn module_docs(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Submodules of the folder `dir` (module `path`) missing from both the
/// map and the folder's docs, recursively.
fn check_folder(dir: &Path, path: &str, map: &str, missing: &mut Vec<String>) {
    let docs = module_docs(&dir.join("mod.rs"));
    for sub in modules(dir) {
        if !map.contains(&format!("`{sub}")) && !docs.contains(&format!("`{sub}")) {
            missing.push(format!("{path}/{sub}"));
        }
        let d = dir.join(&sub);
        if d.join("mod.rs").exists() {
            check_folder(&d, &format!("{path}/{sub}"), map, missing);
        }
    }
}

#[test]
fn every_module_is_in_the_map() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let map = module_docs(&src.join("lib.rs"));
    let main = fs::read_to_string(src.join("main.rs")).unwrap();
    let mut missing = Vec::new();
    for m in modules(&src) {
        let of_binary = main.lines().any(|l| l.trim() == format!("mod {m};"));
        let named = if of_binary {
            map.contains(&format!("`{m}`"))
        } else {
            map.contains(&format!("[`{m}`]"))
        };
        if !named {
            missing.push(format!("src/{m}"));
        }
        let dir = src.join(&m);
        if dir.join("mod.rs").exists() {
            check_folder(&dir, &format!("src/{m}"), &map, &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "modules not named in lib.rs's map: {missing:?}"
    );
}
