//! Gives each build of the sources an id (`SEFI_BUILD`): a hash of everything that shapes the
//! messages between the page and its GPU worker. The page and the worker are two binaries built
//! from one checkout, so they get the same id; after a redeploy a page that meets a worker of
//! another build can tell (see `app::protocol::Versioned`).

use std::path::Path;

/// FNV-1a, 64 bits: stable across compilers and platforms, unlike std's hasher.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            visit(&path, files);
        } else {
            files.push(path);
        }
    }
}

fn main() {
    let mut files = vec!["Cargo.toml".into(), "Cargo.lock".into()];
    visit(Path::new("src"), &mut files);
    files.sort();
    let mut hash = 0xcbf2_9ce4_8422_2325;
    for file in &files {
        fnv(&mut hash, file.to_string_lossy().as_bytes());
        fnv(&mut hash, &std::fs::read(file).unwrap_or_default());
    }
    println!("cargo:rustc-env=SEFI_BUILD={hash:016x}");
    for watched in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={watched}");
    }
}
