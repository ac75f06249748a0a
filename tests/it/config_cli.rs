//! `fluxcap config show` and configuration errors, through the real binary.

use crate::harness::*;

#[test]
fn config_show_merges_file_env_and_flags() {
    let ws = Workspace::new(
        "http://127.0.0.1:1",
        None,
        None,
        "zstd_level = 5",
        &[("orders", "json")],
    );
    let out = ws
        .cmd()
        .args(["--set", "archive.flush.max_age=90s", "config", "show"])
        .env("FLUXCAP_AWS_REGION", "eu-central-1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(shown["aws"]["region"].as_str(), Some("eu-central-1"));
    assert_eq!(shown["archive"]["zstd_level"].as_integer(), Some(5));
    assert_eq!(shown["archive"]["flush"]["max_age"].as_str(), Some("90s"));
    assert_eq!(
        shown["archive"]["flush"]["memory_budget"].as_str(),
        Some("512MiB")
    );
    assert_eq!(shown["streams"][0]["name"].as_str(), Some("orders"));
    let text = toml::to_string(&shown).unwrap();
    assert!(
        !text.to_lowercase().contains("secret"),
        "no credentials in config show"
    );
}

#[test]
fn bad_configuration_exits_2_naming_file_and_key() {
    let ws = Workspace::new(
        "http://127.0.0.1:1",
        None,
        None,
        "compression = \"zstd\"",
        &[],
    );
    let out = ws.run(&["config", "show"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fluxcap.toml") && err.contains("archive.compression"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");

    let ws = Workspace::new("http://127.0.0.1:1", None, None, "", &[("orders", "yaml")]);
    let out = ws.run(&["config", "show"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("streams[0].format") && err.contains("fluxcap.toml"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluxcap"))
        .args(["config", "show"])
        .env("FLUXCAP_CONFIG", "/no/such/file.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml"));
}

#[test]
fn unwritable_archive_location_is_named() {
    let ws = Workspace::new(
        "http://127.0.0.1:1",
        Some("/proc/fluxcap-cannot-write-here"),
        None,
        "",
        &[("s", "json")],
    );
    let out = ws.run(&["archive", "--once"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/proc/fluxcap-cannot-write-here"), "{err}");
}
