//! The `cloud-gw` command line on a scratch directory. (Also what makes
//! `cargo nextest run --workspace` build the binary the end-to-end link
//! suites start.)

use std::process::Command;

fn cloud_gw(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-gw"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running cloud-gw")
}

#[test]
fn init_token_list_revoke() {
    let d = tempfile::tempdir().unwrap();
    let o = cloud_gw(d.path(), &["token", "create"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cloud-gw init"));

    let o = cloud_gw(
        d.path(),
        &["init", "--san", "127.0.0.1", "--san", "gw.local"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pin = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("CA pin: ").map(str::to_string))
        .expect("a CA pin");
    // A second init keeps the CA unless forced.
    let o = cloud_gw(d.path(), &["init", "--san", "127.0.0.1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));

    let o = cloud_gw(d.path(), &["token", "create", "--ttl", "2h"]);
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        token.starts_with("ort1.") && token.ends_with(&pin),
        "{token}"
    );
    let id = token.split('.').nth(1).unwrap().to_string();
    let o = cloud_gw(d.path(), &["token", "create", "--ttl", "2 weeks"]);
    assert!(!o.status.success());

    let o = cloud_gw(d.path(), &["token", "revoke", &id]);
    assert!(o.status.success());
    let list = String::from_utf8_lossy(&cloud_gw(d.path(), &["token", "list"]).stdout).into_owned();
    assert!(list.contains(&id) && list.contains("revoked"), "{list}");
    let o = cloud_gw(d.path(), &["token", "revoke", "nosuch"]);
    assert!(!o.status.success());
}
