//! The shared libraries a dynamic executable loads, by parsing `ldd`, at the
//! paths the loader will look for them (there is no musl target).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// A shared object an executable loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLibrary {
    /// Where the loader looks for it, e.g. `/lib/x86_64-linux-gnu/libc.so.6`
    /// or the interpreter `/lib64/ld-linux-x86-64.so.2`.
    pub image_path: String,
    /// The file itself on the host, symlinks resolved.
    pub host_file: PathBuf,
}

/// Directories glibc's loader searches without an `ld.so.cache`, which these
/// images do not have: `/lib`, `/usr/lib`, `/lib64`, `/usr/lib64` and their
/// multiarch subdirectories.
fn in_default_lib_dir(path: &Path) -> bool {
    const DIRS: [&str; 4] = ["/lib", "/usr/lib", "/lib64", "/usr/lib64"];
    let Some(dir) = path.parent() else { return false };
    DIRS.iter().any(|d| dir == Path::new(d) || dir.parent() == Some(Path::new(d)))
}

/// The shared objects `ldd` lists for `elf` (its whole closure, the loader
/// included); empty for a static executable. Fails when one is not found.
pub fn shared_libraries(elf: &Path) -> Result<Vec<SharedLibrary>> {
    let mut magic = [0u8; 4];
    File::open(elf).and_then(|mut f| f.read_exact(&mut magic)).with_context(|| format!("reading {}", elf.display()))?;
    if &magic != b"\x7fELF" {
        return Ok(vec![]);
    }
    let out = Command::new("ldd")
        .arg(elf)
        .env("LC_ALL", "C")
        .output()
        .with_context(|| format!("running ldd {}", elf.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
        return Ok(vec![]);
    }
    ensure!(out.status.success(), "ldd {} failed ({}): {}", elf.display(), out.status, stderr.trim());
    let libs = parse_ldd(&stdout).with_context(|| format!("ldd {}", elf.display()))?;
    libs.into_iter()
        .map(|(image_path, host)| {
            let host_file =
                std::fs::canonicalize(&host).with_context(|| format!("resolving {} (ldd {})", host, elf.display()))?;
            Ok(SharedLibrary { image_path, host_file })
        })
        .collect()
}

/// `/a/b/../c` as `/a/c` (no symlinks followed).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            parts.pop();
        } else {
            parts.push(part);
        }
    }
    format!("/{}", parts.join("/"))
}

/// `(path in the image, path on the host)` for each object of an ldd listing:
///
/// ```text
/// linux-vdso.so.1 (0x…)                                  the kernel's: skipped
/// libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)     found by the loader's search
/// /lib64/ld-linux-x86-64.so.2 (0x…)                      the interpreter, by its path
/// /lib64/ld-linux-x86-64.so.2 => /usr/lib64/ld-… (0x…)   the same, as some ldd print it
/// libLLVM.so.19.1 => /usr/lib/llvm-19/bin/../lib/libLLVM.so.19.1   by $ORIGIN: kept there
/// libfoo.so.1 => not found                               an error
/// ```
fn parse_ldd(listing: &str) -> Result<Vec<(String, String)>> {
    let mut libs = Vec::new();
    let mut missing = Vec::new();
    for line in listing.lines().map(str::trim) {
        if line.is_empty() || line == "statically linked" {
            continue;
        }
        let strip_addr = |s: &str| s.split(" (0x").next().unwrap_or_default().trim().to_string();
        let (image_path, host) = match line.split_once("=>") {
            Some((name, found)) => {
                let (name, found) = (name.trim(), found.trim());
                if found.starts_with("not found") {
                    missing.push(name.to_string());
                    continue;
                }
                let found = strip_addr(found);
                if found.is_empty() {
                    continue; // `linux-vdso.so.1 =>  (0x…)`, older ldd
                }
                // `$ORIGIN/../lib` in the executable's RUNPATH (LLVM's tools):
                // the loader finds it the same way in an image that keeps the
                // executable at its host path.
                let found = if found.contains("/../") { normalize(&found) } else { found };
                let by_origin = line.contains("/../");
                let image_path = if name.starts_with('/') { name.to_string() } else { found.clone() };
                if !name.starts_with('/') && !by_origin && !in_default_lib_dir(Path::new(&found)) {
                    bail!(
                        "{name} resolves to {found}, outside the loader's default directories; \
                         the image has no ld.so.cache to find it there"
                    );
                }
                (image_path, found)
            }
            None => {
                let path = strip_addr(line);
                if !path.starts_with('/') {
                    continue; // linux-vdso.so.1
                }
                (path.clone(), path)
            }
        };
        libs.push((image_path, host));
    }
    ensure!(missing.is_empty(), "shared libraries not found: {}", missing.join(", "));
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_listing_gives_the_loaders_paths() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_ldd(listing).unwrap(),
            vec![
                ("/lib/x86_64-linux-gnu/libgcc_s.so.1".into(), "/lib/x86_64-linux-gnu/libgcc_s.so.1".into()),
                ("/lib/x86_64-linux-gnu/libc.so.6".into(), "/lib/x86_64-linux-gnu/libc.so.6".into()),
                ("/lib64/ld-linux-x86-64.so.2".into(), "/lib64/ld-linux-x86-64.so.2".into()),
            ]
        );
        let arrow = "\t/lib64/ld-linux-x86-64.so.2 => /usr/lib64/ld-linux-x86-64.so.2 (0x1)\n";
        assert_eq!(
            parse_ldd(arrow).unwrap(),
            vec![("/lib64/ld-linux-x86-64.so.2".into(), "/usr/lib64/ld-linux-x86-64.so.2".into())]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n\tlibbar.so => not found\n").unwrap_err().to_string();
        assert!(err.contains("libfoo.so.1, libbar.so"), "{err}");
        let err = parse_ldd("\tlibx.so => /opt/x/lib/libx.so (0x1)\n").unwrap_err().to_string();
        assert!(err.contains("ld.so.cache"), "{err}");
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        // Found through RUNPATH $ORIGIN/../lib: kept where the loader found it.
        let origin = "\tlibLLVM.so.19.1 => /usr/lib/llvm-19/bin/../lib/libLLVM.so.19.1 (0x1)\n";
        assert_eq!(
            parse_ldd(origin).unwrap(),
            vec![("/usr/lib/llvm-19/lib/libLLVM.so.19.1".into(), "/usr/lib/llvm-19/lib/libLLVM.so.19.1".into())]
        );
    }
}
