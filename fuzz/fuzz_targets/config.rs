//! The configuration file, on any text, through the daemon's own loader
//! ([`Config::from_toml_str`]): it must never panic; a file it accepts satisfies every
//! bound the daemon relies on, and writes back (as `portgate` would write its defaults) to
//! a file that loads to the same configuration.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portgate::config::{
    AuthConfig, Config, MAX_ENDPOINTS, MAX_IFNAME_LEN, MAX_RETRIES_LIMIT, MAX_SOCKET_MODE,
    valid_node_name,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("/etc/portgate/portgate.toml");
    let config = match Config::from_toml_str(text, origin) {
        Ok(config) => config,
        Err(err) => {
            // Every refusal names the file it is about.
            let message = err.to_string();
            assert!(message.contains("/etc/portgate/portgate.toml"), "{message}");
            return;
        }
    };
    let ports = &config.ports;
    assert!(ports.min_port >= 1 && ports.min_port <= ports.max_port);
    assert!(!ports.timeout.is_zero());
    assert!(ports.max_retries <= MAX_RETRIES_LIMIT);
    let range = ports.min_port..=ports.max_port;
    assert!(ports.reserved_ports.iter().all(|port| range.contains(port)));
    assert!(ports.reserved_ports.len() < range.len());
    let daemon = &config.daemon;
    for path in [
        &daemon.state_dir,
        &daemon.pin_dir,
        &daemon.socket,
        &daemon.audit_log,
    ] {
        assert!(path.is_absolute(), "{path:?}");
    }
    assert!(daemon.socket_mode.bits() <= MAX_SOCKET_MODE);
    assert!(!daemon.admin_group.trim().is_empty());
    assert!(
        daemon.xdp_interfaces.iter().all(|name| {
            (1..=MAX_IFNAME_LEN).contains(&name.len()) && !name.contains(['/', ':'])
        })
    );
    assert!(config.auth.window >= std::time::Duration::from_secs(1));
    assert!(config.auth.window <= AuthConfig::MAX_WINDOW);
    if let Some(cluster) = &config.cluster {
        assert!((1..=MAX_ENDPOINTS).contains(&cluster.etcd.len()));
        assert!(cluster.node.as_deref().is_none_or(valid_node_name));
    }
    // Validation holds for the values, not only for the file.
    assert!(config.validate().is_ok());
    // Written back, it loads again to the same configuration.
    let written = toml::to_string(&config)
        .unwrap_or_else(|err| panic!("{config:?} does not write as TOML: {err}"));
    let again = Config::from_toml_str(&written, origin).unwrap_or_else(|err| {
        panic!("the configuration written back is refused: {err}\n{written}")
    });
    assert_eq!(
        again, config,
        "the configuration changes when written back:\n{written}"
    );
});
