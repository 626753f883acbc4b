//! The monitoring kit (issue #16): the Prometheus alerting rules in `dist/prometheus/`
//! pass `promtool check rules` and their unit tests (`promtool test rules`); the Grafana
//! dashboard in `dist/grafana/` is importable and every query of it parses; every metric
//! the rules, their tests, the dashboard and `docs/monitoring.md` name is one a real daemon
//! exports (or the golden exposition shows); the real daemon's exposition passes
//! `promtool check metrics`; and every metric and label value it shows is documented in
//! `docs/monitoring.md`, so that the guide cannot fall behind the daemon.
//!
//! promtool comes with Prometheus (`cargo xtask setup` installs the distribution's
//! `prometheus` package). Without it a test prints `SKIPPED`, and fails when `CI` is set.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use portgate::{
    knock::{self, GrantFor, KeyFile, KnockRequest},
    model::Protocol,
};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, REFUSED_WITHIN, cannot_run, connect_from, eventually,
        listen_in, loopback, which,
    },
    require_privileges,
};

use crate::knock::{LISTENER, knocking_daemon};

const RULES: &str = "dist/prometheus/portgate-alerts.yml";
const RULE_TESTS: &str = "dist/prometheus/portgate-alerts.test.yml";
const DASHBOARD: &str = "dist/grafana/portgate.json";
const GUIDE: &str = "docs/monitoring.md";
const GOLDEN: &str = "portgate/src/manager/testdata/metrics.txt";

/// A file of the repository.
fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo_file(path)).unwrap_or_else(|err| panic!("reading {path}: {err}"))
}

/// promtool, or `None` once it is said why `test` cannot run (under `CI`, a failure).
fn promtool(test: &str) -> Option<PathBuf> {
    let found = which("promtool");
    if found.is_none() {
        cannot_run(
            test,
            "promtool is missing: run `cargo xtask setup` (apt-get install prometheus)",
        );
    }
    found
}

/// Runs promtool with `args` (and `input` on its standard input): whether it succeeded,
/// and what it printed on both outputs.
fn run_promtool(promtool: &Path, args: &[&str], input: Option<&str>) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("running promtool {args:?}: {err}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("promtool's stdin");
        stdin
            .write_all(input.as_bytes())
            .expect("writing to promtool");
    }
    let output = child.wait_with_output().expect("waiting for promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool("monitoring::the_alert_rules_pass_promtool") else {
        return;
    };
    for (args, file) in [(["check", "rules"], RULES), (["test", "rules"], RULE_TESTS)] {
        let path = repo_file(file);
        let (ok, out) = run_promtool(
            &promtool,
            &[args[0], args[1], &path.to_string_lossy()],
            None,
        );
        assert!(ok, "promtool {} {file}:\n{out}", args.join(" "));
        assert!(
            out.contains("SUCCESS"),
            "promtool {}: {out}",
            args.join(" ")
        );
    }
}

/// Every query of the dashboard's panels, rows' panels included.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("the dashboard's panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    queries
}

#[test]
fn the_dashboard_is_importable_and_every_query_parses() {
    let Some(promtool) = promtool("monitoring::the_dashboard_is_importable") else {
        return;
    };
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].is_u64(), "no schemaVersion");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    assert!(
        variables.iter().any(|var| var["type"] == "datasource"
            && var["query"] == "prometheus"
            && var["name"] == "datasource"),
        "a Prometheus datasource variable, named datasource"
    );
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    // Grafana's variables, as Prometheus would get them.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let query = query
            .replace("$instance", ".+")
            .replace("$__rate_interval", "5m");
        assert!(!query.contains('$'), "a variable left in {query}");
        // A JSON string is a YAML double-quoted scalar.
        let quoted = serde_json::to_string(&query).expect("quote");
        writeln!(
            rules,
            "      - record: dashboard_query_{i}\n        expr: {quoted}"
        )
        .expect("writing to a String");
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("dashboard-queries.yml");
    fs::write(&file, rules).expect("write the queries");
    let (ok, out) = run_promtool(
        &promtool,
        &["check", "rules", &file.to_string_lossy()],
        None,
    );
    assert!(ok, "the dashboard's queries do not all parse:\n{out}");
}

/// A sample line's name and labels (`name{a="x",b="y"} value`).
fn sample(line: &str) -> (&str, Vec<(&str, String)>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..end];
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let mut rest = &line[end + 1..];
        while let Some((key, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next().expect("a closed label value") {
                    (_, '\\') => value.extend(chars.next().map(|(_, c)| c)),
                    (at, '"') => break at,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim_start_matches(','), value));
            rest = &after[close + 1..];
            if rest.starts_with('}') {
                break;
            }
        }
    }
    (name, labels)
}

/// What an exposition declares: each family's type, and each sample's name with the
/// values each of its labels took.
#[derive(Default)]
struct Exposition {
    families: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exposition {
    fn read(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let (family, kind) = declared.split_once(' ').expect("# TYPE name type");
                self.families.insert(family.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (name, labels) = sample(line);
                let entry = self.samples.entry(name.to_owned()).or_default();
                for (key, value) in labels {
                    entry.entry(key.to_owned()).or_default().insert(value);
                }
            }
        }
    }

    /// The name a family's samples go by in a query: a counter's with `_total`.
    fn query_name(&self, family: &str) -> String {
        if self.families[family] == "counter" {
            format!("{family}_total")
        } else {
            family.to_owned()
        }
    }
}

/// The metric names (`portgate_*`, `process_*`) written in `text`.
fn metric_names(text: &str) -> BTreeSet<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("portgate_") || word.starts_with("process_"))
        .collect()
}

/// The exposition in the text format 0.0.4, which promtool reads: a counter's `# HELP` and
/// `# TYPE` name it with its `_total`, as its samples do, and no `# EOF`.
fn as_text_format(text: &str, exposition: &Exposition) -> String {
    let mut converted = String::new();
    for line in text.lines().filter(|line| *line != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (family, tail) = rest.split_once(' ')?;
            (exposition.families.get(family)? == "counter")
                .then(|| format!("{prefix}{family}_total {tail}"))
        });
        converted.push_str(renamed.as_deref().unwrap_or(line));
        converted.push('\n');
    }
    converted
}

/// `promtool check metrics` on the daemon's exposition. The daemon serves `OpenMetrics`
/// (`application/openmetrics-text`), where a counter's family is named without `_total`;
/// promtool 2 reads the older text format, where the family is the samples' name, and so
/// says of each counter that it has no help. Those are the only complaints allowed; the
/// same text in the older format must pass clean.
fn check_metrics(promtool: &Path, text: &str, exposition: &Exposition) {
    let (_, out) = run_promtool(promtool, &["check", "metrics"], Some(text));
    for complaint in out.lines().filter(|line| !line.trim().is_empty()) {
        let explained = complaint
            .strip_suffix("_total no help text")
            .is_some_and(|family| {
                exposition
                    .families
                    .get(family)
                    .is_some_and(|k| k == "counter")
            });
        assert!(explained, "promtool check metrics: {complaint}\n{out}");
    }
    let (ok, out) = run_promtool(
        promtool,
        &["check", "metrics"],
        Some(&as_text_format(text, exposition)),
    );
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics on the text format:\n{out}"
    );
}

/// The labels whose values are free (numbers, names the operator chose): not listed in
/// the guide one by one.
const FREE_LABELS: [&str; 3] = ["port", "netns", "le"];

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_real_daemon_exports_what_the_rules_and_dashboard_use_and_the_guide_documents_it() {
    if !require_privileges!() {
        return;
    }
    let Some(promtool) = promtool("monitoring::a_real_daemon_exports_what_the_rules") else {
        return;
    };
    // Ports with a limit, an allowlist and knock authentication, and traffic on each, so
    // that every family has series (the API latency's and the knocks' appear once used).
    let (daemon, knocked, _knocked_server) = knocking_daemon(41_800);
    let (limited, listed, unallocated) = (41_801_u16, 41_802_u16, 41_805);
    let alloc = |port: u16, extra: &[&str]| {
        let port = port.to_string();
        let mut args = vec!["alloc", "--owner", "web", "--port", &port];
        args.extend_from_slice(extra);
        daemon.cli_ok(None, &args);
    };
    alloc(limited, &["--max-conns", "2"]);
    alloc(listed, &["--allow", "10.99.0.0/16"]);
    let _servers: Vec<EchoServer> = [limited, listed]
        .into_iter()
        .map(|port| {
            daemon
                .ns
                .run(|| EchoServer::serve(listen_in(&daemon.cgroup, loopback(port))))
        })
        .collect();
    let connect = |port: u16, within| {
        daemon
            .ns
            .run(|| connect_from(LOCAL, loopback(port), within))
    };
    let held: Vec<_> = (0..2)
        .map(|_| connect(limited, CONNECT_WITHIN).expect("a connection within the limit"))
        .collect();
    assert!(connect(limited, REFUSED_WITHIN).is_err(), "over the limit");
    assert!(
        connect(listed, REFUSED_WITHIN).is_err(),
        "not in the allowlist"
    );
    assert!(
        connect(unallocated, REFUSED_WITHIN).is_err(),
        "not allocated"
    );
    assert!(connect(knocked, REFUSED_WITHIN).is_err(), "no grant yet");
    let key_file = daemon.cli_ok(
        None,
        &["key", "add", "monitor", "--port", &knocked.to_string()],
    );
    let key_file = KeyFile::parse(&key_file).expect("the CLI prints a key file");
    let listener = SocketAddr::new(LOCAL, LISTENER);
    let request = KnockRequest {
        protocol: Protocol::Tcp,
        port: knocked,
        ttl: Duration::from_mins(5),
        grant_for: GrantFor::ThisHost,
    };
    daemon
        .ns
        .run(|| knock::knock(listener, &key_file, &request))
        .expect("knock");
    daemon.ns.run(|| {
        let socket = UdpSocket::bind((LOCAL, 0)).expect("a UDP socket");
        socket.send_to(&[7; 80], listener).expect("a junk knock");
    });
    assert!(
        eventually(CONNECT_WITHIN, || connect(knocked, REFUSED_WITHIN).is_ok()),
        "the knock lets the client in"
    );
    // A client that sends nothing is cut after the header timeout (10 s).
    let idle = UnixStream::connect(&daemon.socket).expect("connect to the API socket");
    let counted = |text: &str| {
        text.contains("portgate_auth_total{result=\"refused\"")
            && text.contains("portgate_api_connections_cut_total{reason=\"header_timeout\"}")
    };
    let mut text = String::new();
    assert!(
        eventually(Duration::from_mins(1), || {
            text = daemon
                .api(portgate::client::Client::metrics)
                .expect("GET /metrics");
            counted(&text)
        }),
        "the junk knock and the idle connection are counted:\n{text}"
    );
    drop((held, idle));

    let mut real = Exposition::default();
    real.read(&text);
    check_metrics(&promtool, &text, &real);
    let mut known = Exposition::default();
    known.read(&text);
    known.read(&read(GOLDEN));
    for family in [
        "portgate_api_request_duration_seconds",
        "portgate_auth",
        "portgate_api_connections_cut",
        "portgate_api_connections_limit",
        "portgate_port_max_connections",
    ] {
        assert!(real.families.contains_key(family), "{family} in:\n{text}");
    }

    // Everything the rules, their tests, the dashboard and the guide name is exported (a
    // histogram may also be named by its family).
    let exported = |name: &str| {
        known.samples.contains_key(name)
            || known
                .families
                .get(name)
                .is_some_and(|kind| kind == "histogram")
    };
    for file in [RULES, RULE_TESTS, DASHBOARD, GUIDE] {
        let written = read(file);
        let unknown: Vec<_> = metric_names(&written)
            .into_iter()
            .filter(|name| !exported(name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics no daemon exports: {unknown:?}"
        );
    }

    // The guide documents every one, with every value of its labels.
    let guide = read(GUIDE);
    let documented = metric_names(&guide);
    for family in known.families.keys() {
        let name = known.query_name(family);
        assert!(
            documented.contains(name.as_str()),
            "{GUIDE} does not document {name}"
        );
    }
    for (name, labels) in &known.samples {
        for (label, values) in labels {
            if FREE_LABELS.contains(&label.as_str()) {
                continue;
            }
            for value in values {
                assert!(
                    guide.contains(&format!("`{value}`"))
                        || guide.contains(&format!("\"{value}\"")),
                    "{GUIDE} does not document {name}{{{label}=\"{value}\"}}"
                );
            }
        }
    }
}
