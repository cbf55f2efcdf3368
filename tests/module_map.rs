//! The module map in `src/lib.rs` names every module: each file or folder
//! under `src/` (a top-level module) must appear as ``[`name`]``, and each
//! submodule file of a folder as `` `name` `` somewhere in the map or in
//! its folder's `mod.rs` docs. A module added without a line in the map
//! fails here.

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
            && !matches!(name.as_str(), "lib" | "main" | "mod")
        {
            out.push(name);
        }
    }
    out.sort();
    out
}

#[test]
fn every_module_is_in_the_map() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let map: String = lib
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut missing = Vec::new();
    for m in modules(&src) {
        if !map.contains(&format!("[`{m}`]")) {
            missing.push(format!("src/{m}"));
        }
        let dir = src.join(&m);
        if dir.is_dir() {
            let docs = fs::read_to_string(dir.join("mod.rs")).unwrap();
            for sub in modules(&dir) {
                if !map.contains(&format!("`{sub}`")) && !docs.contains(&format!("`{sub}")) {
                    missing.push(format!("src/{m}/{sub}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules not named in lib.rs's map: {missing:?}"
    );
}
