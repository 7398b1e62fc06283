//! Running a delegated plugin (the IPAM named in `ipam.type`) the way libcni's
//! ExecPluginWithResult does: found in CNI_PATH, same stdin, same environment
//! but CNI_COMMAND, stdout parsed as a result or a CNI error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use super::{CniError, CniResult, Command, code};

/// The executable `plugin` in the first CNI_PATH directory that has it.
pub fn find_in_path(plugin: &str, path: &[PathBuf]) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') || plugin == ".." || plugin.chars().any(char::is_whitespace) {
        return Err(CniError::new(code::INVALID_CONFIG, format!("plugin type {plugin:?} is not a plugin name")));
    }
    path.iter().map(|d| d.join(plugin)).find(|p| p.is_file()).ok_or_else(|| {
        let dirs: Vec<String> = path.iter().map(|p| p.display().to_string()).collect();
        CniError::new(code::INVALID_CONFIG, format!("plugin {plugin:?} not found in CNI_PATH ({})", dirs.join(":")))
    })
}

/// Runs `binary` for `command` with `stdin`; returns its stdout JSON (None when empty).
pub fn exec(binary: &Path, command: Command, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let name = binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut child = Process::new(binary)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::internal(format!("running {} {}: {e}", name, command.as_str())))?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).map_err(|e| {
            CniError::new(code::IO_FAILURE, format!("writing config to {name} {}: {e}", command.as_str()))
        })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::internal(format!("waiting for {name} {}: {e}", command.as_str())))?;
    let body = String::from_utf8_lossy(&out.stdout);
    let body = body.trim();
    if !out.status.success() {
        return Err(match CniError::from_json(body.as_bytes()) {
            Some(mut e) => {
                e.msg = format!("{name} {}: {}", command.as_str(), e.msg);
                e
            }
            None => {
                CniError::internal(format!("{name} {} failed ({}) with output {body:?}", command.as_str(), out.status))
            }
        });
    }
    if body.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(body)
        .map(Some)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("{name} {} printed no JSON: {e}", command.as_str())))
}

/// ADD through the IPAM plugin: its result, which must hold at least one IP.
pub fn ipam_add(binary: &Path, stdin: &[u8]) -> Result<CniResult, CniError> {
    let name = binary.display();
    let v = exec(binary, Command::Add, stdin)?
        .ok_or_else(|| CniError::internal(format!("IPAM plugin {name} ADD printed no result")))?;
    let res = CniResult::parse(&v)?;
    if res.ips.is_empty() {
        return Err(CniError::internal(format!("IPAM plugin {name} ADD returned no IP address")));
    }
    Ok(res)
}
