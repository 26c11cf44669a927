//! The command line as a user meets it: configuration errors are clear,
//! and images can be imported, listed and removed without the daemon.
//! (Also makes cargo build the binary the end-to-end suites run.)

use std::process::Command;

fn edge_rt(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edge-rt"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run edge-rt")
}

#[test]
fn a_typo_in_the_config_is_named() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("config.toml");
    std::fs::write(&cfg, "[runtime]\nstate_dri = \"/x\"\n").expect("write");
    let out = edge_rt(&cfg, &["ps"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state_dri") && err.contains("config.toml"),
        "{err}"
    );
}

#[test]
fn a_missing_explicit_config_is_an_error() {
    let out = edge_rt(std::path::Path::new("/nonexistent/edge-rt.toml"), &["ps"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edge-rt.toml"));
}

#[test]
fn images_list_and_remove_on_an_empty_store() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndata_dir = {:?}\n[runtime]\nstate_dir = {:?}\n",
            d.path().join("data"),
            d.path().join("run")
        ),
    )
    .expect("write");
    let out = edge_rt(&cfg, &["images", "list", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = edge_rt(&cfg, &["images", "rm", "busybox"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found in the local store"));
}
