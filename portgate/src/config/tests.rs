//! The file as a whole: defaults, `dist/portgate.toml`, and each rule's message as the CLI
//! prints it. The typed values' own rules are tested in `values.rs`.

use std::collections::BTreeSet;

use super::*;

const ORIGIN: &str = "/etc/portgate/test.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new(ORIGIN))
}

/// The line the CLI prints for `error` (the error and its causes), after checking that no
/// cause repeats what the message before it already says.
fn printed(error: ConfigError) -> String {
    let error = anyhow::Error::from(error);
    for (outer, cause) in error.chain().zip(error.chain().skip(1)) {
        let (outer, cause) = (outer.to_string(), cause.to_string());
        assert!(
            !outer.contains(&cause),
            "{outer:?} repeats its cause {cause:?}"
        );
    }
    crate::text::error_chain(error.as_ref())
}

/// The line printed for the error `text` gives, after checking it names the file and `key`
/// and stays on one line.
fn error_naming(text: &str, key: &str) -> String {
    let message = printed(parse(text).expect_err("the config should be refused"));
    assert!(message.starts_with(ORIGIN), "no file in: {message}");
    assert!(message.contains(key), "no {key} in: {message}");
    assert!(!message.contains('\n'), "more than one line: {message}");
    message
}

fn key_paths(table: &toml::Table) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (name, value) in table {
        keys.insert(name.clone());
        if let toml::Value::Table(section) = value {
            keys.extend(section.keys().map(|key| format!("{name}.{key}")));
        }
    }
    keys
}

#[test]
fn defaults_are_valid_without_warnings() {
    let config = Config::default();
    assert_eq!(config.validate().unwrap(), Vec::<String>::new());
    assert_eq!(config.ports.min_port, 20_000);
    assert_eq!(config.ports.max_port, 29_999);
    assert_eq!(config.ports.timeout, Duration::from_secs(30));
    assert_eq!(config.ports.quarantine, Duration::from_secs(10));
    assert_eq!(config.daemon.cgroup, CgroupTarget::Auto);
    assert_eq!(config.daemon.socket_mode.bits(), 0o660);
    assert_eq!(
        config.daemon.metrics_listen,
        Some("127.0.0.1:9477".parse().unwrap())
    );
}

#[test]
fn defaults_serialize_to_the_file_spelling() {
    let defaults: toml::Table =
        toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
    let daemon = defaults["daemon"].as_table().unwrap();
    for (key, value) in [
        ("cgroup", "auto"),
        ("socket_mode", "0660"),
        ("metrics_listen", "127.0.0.1:9477"),
    ] {
        assert_eq!(daemon[key].as_str(), Some(value), "daemon.{key}");
    }
}

#[test]
fn dist_example_equals_the_defaults() {
    let text = include_str!("../../../dist/portgate.toml");
    assert_eq!(
        Config::from_toml_str(text, Path::new("dist/portgate.toml")).unwrap(),
        Config::default()
    );
}

#[test]
fn dist_example_lists_every_key() {
    let example: toml::Table = toml::from_str(include_str!("../../../dist/portgate.toml")).unwrap();
    let defaults: toml::Table =
        toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
    assert_eq!(key_paths(&example), key_paths(&defaults));
}

#[test]
fn empty_file_gives_the_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn partial_file_keeps_the_other_defaults() {
    let config = parse(
        "[ports]\nmin_port = 40000\nmax_port = 40999\ntimeout = \"5m\"\n\
         [daemon]\nxdp_interfaces = [\"eth0\"]\nkernel_log = true\n",
    )
    .unwrap();
    let mut expected = Config::default();
    expected.ports.min_port = 40_000;
    expected.ports.max_port = 40_999;
    expected.ports.timeout = Duration::from_mins(5);
    expected.daemon.xdp_interfaces = vec!["eth0".to_owned()];
    expected.daemon.kernel_log = true;
    assert_eq!(config, expected);
}

#[test]
fn unknown_section_is_named() {
    let message = error_naming("[portz]\nmin_port = 1\n", "unknown key portz");
    assert!(message.contains("`ports`"), "{message}");
}

#[test]
fn unknown_key_in_section_is_named() {
    let message = error_naming(
        "[daemon]\nsockets = \"/run/x\"\n",
        "unknown key daemon.sockets",
    );
    assert!(message.contains("`socket`"), "{message}");
}

#[test]
fn wrong_type_is_named() {
    error_naming(
        "[ports]\nmin_port = \"low\"\n",
        "ports.min_port: invalid type",
    );
    error_naming(
        "[ports]\nreserve_ephemeral = 1\n",
        "ports.reserve_ephemeral",
    );
    error_naming("ports = 3\n", "ports: invalid type");
}

#[test]
fn port_above_u16_is_named() {
    let message = error_naming("[ports]\nmin_port = 70000\n", "ports.min_port");
    assert!(
        message.contains("70000") && message.contains("u16"),
        "{message}"
    );
}

#[test]
fn bad_reserved_port_entry_is_named_with_its_index() {
    error_naming(
        "[ports]\nreserved_ports = [20001, -1]\n",
        "ports.reserved_ports[1]",
    );
}

#[test]
fn bad_duration_is_named() {
    error_naming("[ports]\ntimeout = \"30 parsecs\"\n", "ports.timeout");
    error_naming("[ports]\nquarantine = 10\n", "ports.quarantine");
}

#[test]
fn syntax_error_names_the_line() {
    error_naming("[ports]\nmin_port = = 1\n", "line 2, column");
    error_naming("[ports]\nmin_port = 1\nmin_port = 2\n", "line 3");
}

#[test]
fn min_port_zero() {
    error_naming("[ports]\nmin_port = 0\n", "ports.min_port = 0");
}

#[test]
fn min_port_above_max_port() {
    let message = error_naming(
        "[ports]\nmin_port = 30000\nmax_port = 20000\n",
        "ports.min_port = 30000",
    );
    assert!(message.contains("ports.max_port = 20000"), "{message}");
}

#[test]
fn reserved_port_outside_the_range() {
    error_naming(
        "[ports]\nreserved_ports = [20001, 80]\n",
        "ports.reserved_ports: port 80 is outside",
    );
}

#[test]
fn reserved_port_listed_twice() {
    error_naming(
        "[ports]\nreserved_ports = [20001, 20002, 20001]\n",
        "ports.reserved_ports: port 20001 is listed more than once",
    );
}

#[test]
fn reserved_ports_covering_the_range() {
    let text =
        "[ports]\nmin_port = 20000\nmax_port = 20002\nreserved_ports = [20002, 20000, 20001]\n";
    error_naming(text, "ports.reserved_ports reserves every port");
    let one_left = "[ports]\nmin_port = 20000\nmax_port = 20002\nreserved_ports = [20002, 20000]\n";
    parse(one_left).unwrap();
}

#[test]
fn whole_u16_range_is_accepted() {
    let config =
        parse("[ports]\nmin_port = 1\nmax_port = 65535\nreserved_ports = [1, 65535]\n").unwrap();
    assert_eq!(
        config.validate().unwrap().len(),
        1,
        "the privileged-port warning"
    );
}

#[test]
fn timeout_zero() {
    error_naming("[ports]\ntimeout = \"0s\"\n", "ports.timeout = 0s");
}

#[test]
fn quarantine_zero_is_allowed() {
    let config = parse("[ports]\nquarantine = \"0s\"\n").unwrap();
    assert_eq!(config.ports.quarantine, Duration::ZERO);
}

#[test]
fn max_retries_too_high() {
    error_naming(
        "[ports]\nmax_retries = 1000001\n",
        "ports.max_retries = 1000001",
    );
    parse("[ports]\nmax_retries = 1000000\n").unwrap();
}

#[test]
fn on_owner_exit_is_drain_or_keep() {
    assert_eq!(
        parse("[ports]\non_owner_exit = \"keep\"\n")
            .unwrap()
            .ports
            .on_owner_exit,
        OwnerExit::Keep
    );
    assert_eq!(
        parse("").unwrap().ports.on_owner_exit,
        OwnerExit::Drain,
        "drain by default"
    );
    let message = error_naming(
        "[ports]\non_owner_exit = \"close\"\n",
        "ports.on_owner_exit",
    );
    assert!(message.contains("write \"drain\" or \"keep\""), "{message}");
}

#[test]
fn privileged_min_port_is_a_warning() {
    let config = parse("[ports]\nmin_port = 80\nmax_port = 90\n").unwrap();
    let warnings = config.validate().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("ports.min_port = 80: ports below 1024 are privileged"));
    assert_eq!(config.ports.validate().unwrap(), warnings);
}

#[test]
fn port_config_validate_names_the_key_without_a_file() {
    let ports = PortConfig {
        min_port: 0,
        ..PortConfig::default()
    };
    let message = ports.validate().unwrap_err().to_string();
    assert!(message.starts_with("ports.min_port = 0:"), "{message}");
}

#[test]
fn socket_mode_not_octal() {
    for bad in ["rw-rw----", "0968", "+660", "", "0o660"] {
        let text = format!("[daemon]\nsocket_mode = {bad:?}\n");
        error_naming(&text, "daemon.socket_mode");
    }
}

#[test]
fn socket_mode_above_permission_bits() {
    let message = error_naming("[daemon]\nsocket_mode = \"4770\"\n", "daemon.socket_mode");
    assert!(message.contains("above 0777"), "{message}");
    error_naming("[daemon]\nsocket_mode = \"77777777777777\"\n", "above 0777");
}

#[test]
fn socket_mode_reads_octal() {
    let config = parse("[daemon]\nsocket_mode = \"600\"\n").unwrap();
    assert_eq!(config.daemon.socket_mode.bits(), 0o600);
    let config = parse("[daemon]\nsocket_mode = \"0777\"\n").unwrap();
    assert_eq!(config.daemon.socket_mode.bits(), 0o777);
}

#[test]
fn socket_mode_of_the_wrong_type_is_named() {
    error_naming(
        "[daemon]\nsocket_mode = 660\n",
        "daemon.socket_mode: invalid type",
    );
}

#[test]
fn a_typed_value_says_its_own_rule_once() {
    for (text, rule) in [
        ("[daemon]\nsocket_mode = \"4770\"\n", "in octal"),
        ("[daemon]\nsocket_mode = 660\n", "in octal"),
        (
            "[daemon]\ncgroup = \"Auto\"\n",
            "full path of a cgroup2 directory",
        ),
        ("[daemon]\nmetrics_listen = \"x\"\n", "to turn metrics off"),
    ] {
        let message = printed(parse(text).unwrap_err());
        assert_eq!(message.matches(rule).count(), 1, "{message}");
        assert!(!message.contains("correct the value"), "{message}");
    }
    let message = printed(parse("[ports]\nmin_port = 70000\n").unwrap_err());
    assert!(message.contains("correct the value"), "{message}");
}

#[test]
fn cgroup_must_be_auto_or_absolute() {
    error_naming("[daemon]\ncgroup = \"sys/fs/cgroup\"\n", "daemon.cgroup");
    error_naming("[daemon]\ncgroup = \"\"\n", "daemon.cgroup");
    let message = error_naming("[daemon]\ncgroup = \"Auto\"\n", "daemon.cgroup");
    assert!(
        message.contains("\"Auto\" is neither \"auto\" nor an absolute path"),
        "{message}"
    );
    let config = parse("[daemon]\ncgroup = \"/sys/fs/cgroup/portgate.slice\"\n").unwrap();
    assert_eq!(
        config.daemon.cgroup,
        CgroupTarget::Path("/sys/fs/cgroup/portgate.slice".into())
    );
}

#[test]
fn paths_must_be_absolute() {
    for key in ["state_dir", "pin_dir", "socket", "audit_log"] {
        for bad in ["var/lib/portgate", ""] {
            let text = format!("[daemon]\n{key} = {bad:?}\n");
            error_naming(
                &text,
                &format!("daemon.{key} = {bad:?}: not an absolute path"),
            );
        }
    }
}

#[test]
fn metrics_listen_must_be_a_socket_address() {
    for bad in ["localhost:9477", "127.0.0.1", ":9477", "::1:9477"] {
        let text = format!("[daemon]\nmetrics_listen = {bad:?}\n");
        error_naming(&text, "daemon.metrics_listen");
    }
}

#[test]
fn metrics_listen_empty_or_ipv6() {
    let off = parse("[daemon]\nmetrics_listen = \"\"\n").unwrap();
    assert_eq!(off.daemon.metrics_listen, None);
    let v6 = parse("[daemon]\nmetrics_listen = \"[::1]:9477\"\n").unwrap();
    assert_eq!(
        v6.daemon.metrics_listen,
        Some("[::1]:9477".parse::<SocketAddr>().unwrap())
    );
}

#[test]
fn admin_group_empty() {
    error_naming("[daemon]\nadmin_group = \"\"\n", "daemon.admin_group");
    error_naming("[daemon]\nadmin_group = \"  \"\n", "daemon.admin_group");
}

#[test]
fn xdp_interface_empty() {
    error_naming(
        "[daemon]\nxdp_interfaces = [\"eth0\", \"\"]\n",
        "daemon.xdp_interfaces: \"\" is empty",
    );
}

#[test]
fn xdp_interface_too_long() {
    let message = error_naming(
        "[daemon]\nxdp_interfaces = [\"abcdefghijklmnop\"]\n",
        "daemon.xdp_interfaces: \"abcdefghijklmnop\"",
    );
    assert!(message.contains("15 bytes"), "{message}");
    parse("[daemon]\nxdp_interfaces = [\"abcdefghijklmno\"]\n").unwrap();
}

#[test]
fn xdp_interface_not_a_name() {
    for bad in ["eth/0", "eth0:1", "eth 0", ".."] {
        let text = format!("[daemon]\nxdp_interfaces = [{bad:?}]\n");
        error_naming(&text, "daemon.xdp_interfaces");
    }
}

#[test]
fn xdp_interface_listed_twice() {
    error_naming(
        "[daemon]\nxdp_interfaces = [\"eth0\", \"eth1\", \"eth0\"]\n",
        "daemon.xdp_interfaces: \"eth0\" is listed more than once",
    );
}

#[test]
fn load_reads_and_validates_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portgate.toml");
    std::fs::write(&path, "[ports]\nmin_port = 21000\n").unwrap();
    assert_eq!(Config::load(&path).unwrap().ports.min_port, 21_000);

    std::fs::write(&path, "[ports]\nmin_port = 0\n").unwrap();
    let message = printed(Config::load(&path).unwrap_err());
    assert!(
        message.starts_with(&format!("{}: ports.min_port = 0:", path.display())),
        "{message}"
    );
}

#[test]
fn load_or_default_with_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    assert_eq!(
        Config::load_or_default(&path, false).unwrap(),
        Config::default()
    );
    let error = Config::load_or_default(&path, true).unwrap_err();
    assert!(matches!(error, ConfigError::NotFound { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("config file {} not found:", path.display())),
        "{error}"
    );
    assert!(matches!(
        Config::load(&path),
        Err(ConfigError::NotFound { .. })
    ));
}

#[test]
fn load_or_default_reads_an_existing_file_either_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portgate.toml");
    std::fs::write(&path, "[daemon]\nadmin_group = \"wheel\"\n").unwrap();
    for explicit in [false, true] {
        let config = Config::load_or_default(&path, explicit).unwrap();
        assert_eq!(config.daemon.admin_group, "wheel");
    }
    std::fs::write(&path, "[daemon]\nadmin_group = \"\"\n").unwrap();
    assert!(
        Config::load_or_default(&path, false).is_err(),
        "a bad file is never skipped"
    );
}

#[test]
fn unreadable_path_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let error = Config::load(dir.path()).unwrap_err();
    let ConfigError::Read { source, .. } = &error else {
        panic!("not a read error: {error:?}");
    };
    let cause = source.to_string();
    let message = printed(error);
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert_eq!(message.matches(&cause).count(), 1, "{message}");
}

#[test]
fn the_knock_window_is_bounded_and_the_listener_off_by_default() {
    let config = Config::default();
    assert_eq!(config.auth.listen, None);
    config.validate().unwrap();
    for window in ["0s", "2h"] {
        let mut config = Config::default();
        config.auth.window = humantime::parse_duration(window).unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("auth.window"), "{err}");
    }
}

#[test]
fn a_cluster_section_turns_fleet_mode_on_with_defaults_and_bad_values_are_refused() {
    assert_eq!(
        Config::default().cluster,
        None,
        "no [cluster]: the local store"
    );
    let config = parse("[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"a-1\"\n").unwrap();
    let cluster = config.cluster.expect("fleet mode");
    assert_eq!(cluster.prefix, "/portgate");
    assert_eq!(cluster.timeout, Duration::from_secs(5));
    assert_eq!(cluster.lease, Duration::from_secs(10));
    assert_eq!(cluster.node_name().unwrap(), "a-1");
    for (text, key) in [
        ("etcd = []", "cluster.etcd"),
        ("etcd = [\"127.0.0.1:2379\"]", "cluster.etcd"),
        ("etcd = [\"https://e:2379\"]", "cluster.etcd"),
        (
            "etcd = [\"http://e:2379\"]\nca_file = \"/etc/ca.pem\"",
            "cluster.etcd",
        ),
        ("etcd = [\"http://e:2379\"]\nnode = \"a b\"", "cluster.node"),
        (
            "etcd = [\"http://e:2379\"]\nprefix = \"pg\"",
            "cluster.prefix",
        ),
        (
            "etcd = [\"http://e:2379\"]\nprefix = \"/pg/\"",
            "cluster.prefix",
        ),
        (
            "etcd = [\"http://e:2379\"]\nusername = \"pg\"",
            "cluster.username",
        ),
        (
            "etcd = [\"http://e:2379\"]\nusername = \"pg\"\npassword_file = \"pw\"",
            "cluster.password_file",
        ),
        (
            "etcd = [\"https://e:2379\"]\ncert_file = \"/c.pem\"",
            "cluster.cert_file",
        ),
        (
            "etcd = [\"http://e:2379\"]\ntimeout = \"10ms\"",
            "cluster.timeout",
        ),
        (
            "etcd = [\"http://e:2379\"]\nlease = \"1s\"",
            "cluster.lease",
        ),
        (
            "etcd = [\"http://e:2379\"]\nleader = true",
            "cluster.leader",
        ),
    ] {
        error_naming(&format!("[cluster]\n{text}\n"), key);
    }
}

#[test]
fn audit_rotation_is_bounded_both_ways() {
    for bad in ["0", "4095", "1099511627777"] {
        let message = error_naming(
            &format!("[daemon]\naudit_max_bytes = {bad}\n"),
            &format!("daemon.audit_max_bytes = {bad}:"),
        );
        assert!(message.contains("between 4096"), "{message}");
    }
    for bad in ["0", "101"] {
        error_naming(
            &format!("[daemon]\naudit_keep = {bad}\n"),
            &format!("daemon.audit_keep = {bad}: keep between 1 and 100"),
        );
    }
    error_naming("[daemon]\naudit_keep = -1\n", "daemon.audit_keep");
    let config = parse("[daemon]\naudit_max_bytes = 4096\naudit_keep = 100\n").unwrap();
    assert_eq!(
        (config.daemon.audit_max_bytes, config.daemon.audit_keep),
        (4096, 100)
    );
}
