//! Tests of [`Config::parse`] and [`Config::load`] on whole files: one per class of
//! mistake (exact line, column and key), defaults, WARREN_ZONE, the shipped config.ini
//! and the effective TOML.

use std::path::Path;
use std::time::Duration;

use super::*;

const KNOWN_APPS: &[&str] = &["skel", "echo"];

/// A local zone with one broker, appended to fixtures that are about something else.
const LOCAL_ZONE: &str = "[zones.local]\nbrokers = [\"amqp://guest:guest@127.0.0.1:5672/%2f\"]\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("config.ini"), KNOWN_APPS, None)
}

/// The location, key and problem of a refused file, and the whole message.
struct Refusal {
    line: usize,
    column: usize,
    key: String,
    problem: Problem,
    message: String,
}

fn refuse(text: &str, zone_override: Option<&str>) -> Refusal {
    let err = Config::parse(text, Path::new("config.ini"), KNOWN_APPS, zone_override)
        .expect_err("the file should be refused");
    let message = err.to_string();
    match err {
        ConfigError::Invalid {
            line,
            column,
            key,
            problem,
            ..
        } => Refusal {
            line,
            column,
            key,
            problem,
            message,
        },
        ConfigError::Read { .. } => panic!("unexpected read error: {message}"),
    }
}

fn assert_at(refusal: &Refusal, line: usize, column: usize, key: &str, fragment: &str) {
    assert_eq!(
        (refusal.line, refusal.column, refusal.key.as_str()),
        (line, column, key),
        "{}",
        refusal.message
    );
    assert!(
        refusal.message.contains(fragment),
        "`{fragment}` not in: {}",
        refusal.message
    );
}

// ---------------------------------------------------------------- valid files

#[test]
fn a_full_file_gives_the_expected_values() {
    let text = r#"
[service]
node = "billing@box-7"
shutdown_timeout_secs = 20

[amqp]
zone = "west"
prefetch = 100
heartbeat_secs = 0
connect_timeout_ms = 1500
reconnect_min_ms = 200
reconnect_max_ms = 8000
startup_timeout_secs = 60
prechannels = 0

[zones.west]
brokers = ["amqp://u:p@10.0.0.1:5672/%2f", "amqp://u:p@10.0.0.2/%2f"]

[zones.east]
brokers = ["amqp://u:p@10.1.0.1:5672/%2f"]

[zones.central]
brokers = ["amqp://u:p@10.2.0.1:5672/%2f"]

[pool]
size = 5
overflow = 0
checkout_timeout_ms = 700
idle_timeout_ms = 900

[apps.skel]
enabled = true
pool_size = 2
pool_overflow = 4

[apps.echo]
enabled = false
checkout_timeout_ms = 300
idle_timeout_ms = 400
"#;
    let config = parse(text).unwrap();
    assert_eq!(config.path, Path::new("config.ini"));
    assert_eq!(config.service.node, "billing@box-7");
    assert_eq!(config.service.shutdown_timeout, Duration::from_secs(20));
    let amqp = &config.amqp;
    assert_eq!(amqp.zone, "west");
    assert_eq!(amqp.prefetch, 100);
    assert_eq!(amqp.heartbeat_secs, 0);
    assert_eq!(amqp.connect_timeout, Duration::from_millis(1500));
    assert_eq!(amqp.reconnect_min, Duration::from_millis(200));
    assert_eq!(amqp.reconnect_max, Duration::from_millis(8000));
    assert_eq!(amqp.startup_timeout, Duration::from_secs(60));
    assert_eq!(amqp.prechannels, 0);

    let names: Vec<_> = config.zones.iter().map(|z| z.name.as_str()).collect();
    assert_eq!(names, ["west", "central", "east"]);
    let locals: Vec<_> = config.zones.iter().map(|z| z.local).collect();
    assert_eq!(locals, [true, false, false]);
    let local = config.local_zone();
    assert_eq!(local.name, "west");
    let hosts: Vec<_> = local
        .brokers
        .iter()
        .map(|b| (b.uri.host(), b.uri.port()))
        .collect();
    assert_eq!(hosts, [("10.0.0.1", 5672), ("10.0.0.2", 5672)]);

    assert_eq!(
        config.pool,
        PoolConfig {
            size: 5,
            overflow: 0,
            checkout_timeout: Duration::from_millis(700),
            idle_timeout: Duration::from_millis(900),
        }
    );
    let names: Vec<_> = config.apps.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["echo", "skel"]);
    let skel = config.app("skel").unwrap();
    assert!(skel.enabled);
    assert_eq!(
        skel.pool,
        PoolConfig {
            size: 2,
            overflow: 4,
            checkout_timeout: Duration::from_millis(700),
            idle_timeout: Duration::from_millis(900),
        }
    );
    let echo = config.app("echo").unwrap();
    assert!(!echo.enabled);
    assert_eq!(
        echo.pool,
        PoolConfig {
            size: 5,
            overflow: 0,
            checkout_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(400),
        }
    );
    assert!(config.app("other").is_none());
}

#[test]
fn absent_sections_take_the_defaults() {
    let config = parse(LOCAL_ZONE).unwrap();
    assert!(
        config.service.node.starts_with("warren@"),
        "{}",
        config.service.node
    );
    assert!(config.service.node.len() > "warren@".len());
    assert_eq!(config.service.shutdown_timeout, Duration::from_secs(10));
    let amqp = &config.amqp;
    assert_eq!(amqp.zone, "local");
    assert_eq!(amqp.prefetch, 50);
    assert_eq!(amqp.heartbeat_secs, 10);
    assert_eq!(amqp.connect_timeout, Duration::from_millis(2000));
    assert_eq!(amqp.reconnect_min, Duration::from_millis(100));
    assert_eq!(amqp.reconnect_max, Duration::from_millis(5000));
    assert_eq!(amqp.remote_reconnect_max, Duration::from_millis(30000));
    assert_eq!(amqp.startup_timeout, Duration::from_secs(30));
    assert_eq!(amqp.prechannels, 10);
    assert_eq!(amqp.operation_timeout, Duration::from_millis(5000));
    assert!(config.exchanges.is_empty());
    assert_eq!(
        config.pool,
        PoolConfig {
            size: 10,
            overflow: 20,
            checkout_timeout: Duration::from_millis(2000),
            idle_timeout: Duration::from_millis(30_000),
        }
    );
    assert_eq!(
        config.listener,
        ListenerConfig {
            max_redeliveries: 5,
            stop_timeout: Duration::from_millis(5000),
            publish_timeout: Duration::from_millis(5000),
            max_message_bytes: 16 * 1024 * 1024,
            drain_timeout: Duration::from_millis(30_000),
            fail_back_watch: Duration::from_millis(30_000),
            anonymous_queue_expiry: Duration::from_millis(600_000),
        }
    );
    assert_eq!(
        config.publisher,
        PublisherConfig {
            timeout: Duration::from_millis(5000),
            confirm_window: 1000,
            new_traces: true,
        }
    );
    assert_eq!(
        config.router,
        RouterConfig {
            exchange: "configuration".to_string(),
            buffer: 1000,
        }
    );
    assert!(config.apps.is_empty(), "apps without a section do not run");
    assert_eq!(config.zones.len(), 1);
    assert!(config.local_zone().local);
}

#[test]
fn app_keys_default_from_pool() {
    let text = format!("{LOCAL_ZONE}[pool]\nsize = 3\noverflow = 7\n[apps.skel]\n");
    let config = parse(&text).unwrap();
    let skel = config.app("skel").unwrap();
    assert!(skel.enabled);
    assert_eq!(skel.pool, config.pool);
    assert_eq!(skel.pool.size, 3);
    assert_eq!(skel.pool.overflow, 7);
}

#[test]
fn warren_zone_overrides_the_file() {
    let text = format!(
        "[amqp]\nzone = \"local\"\n{LOCAL_ZONE}[zones.east]\nbrokers = [\"amqp://e:e@east:5672/%2f\"]\n"
    );
    let path = Path::new("config.ini");
    let config = Config::parse(&text, path, KNOWN_APPS, Some("east")).unwrap();
    assert_eq!(config.amqp.zone, "east");
    assert_eq!(config.local_zone().name, "east");
    let order: Vec<_> = config
        .zones
        .iter()
        .map(|z| (z.name.as_str(), z.local))
        .collect();
    assert_eq!(order, [("east", true), ("local", false)]);
    // A blank override counts as none.
    let config = Config::parse(&text, path, KNOWN_APPS, Some("  ")).unwrap();
    assert_eq!(config.amqp.zone, "local");
}

#[test]
fn the_shipped_config_ini_parses() {
    let text = include_str!("../../../config.ini");
    let config = Config::parse(text, Path::new("config.ini"), &["skel", "echo"], None).unwrap();
    assert_eq!(config.amqp.zone, "local");
    let local = config.local_zone();
    assert_eq!(local.brokers.len(), 1);
    assert_eq!(
        local.brokers[0].uri.redacted(),
        "amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(config.zones.len(), 1);
    let skel = config.app("skel").unwrap();
    assert!(skel.enabled);
    assert_eq!((skel.pool.size, skel.pool.overflow), (2, 4));
    assert_eq!(skel.pool.checkout_timeout, Duration::from_millis(2000));
    assert!(config.app("echo").is_some_and(|echo| echo.enabled));
    // Every value written in the shipped file is the default.
    let defaults = parse(LOCAL_ZONE).unwrap();
    assert_eq!(config.pool, defaults.pool);
    assert_eq!(config.amqp.prefetch, defaults.amqp.prefetch);
    assert_eq!(config.amqp.reconnect_max, defaults.amqp.reconnect_max);
    assert_eq!(config.listener, defaults.listener);
    assert_eq!(config.publisher, defaults.publisher);
    assert!(local.brokers[0].tags.is_empty());
}

#[test]
fn the_shipped_tagged_broker_example_parses() {
    // config.ini shows the table form in a comment: uncommented, it must be valid.
    let text = include_str!("../../../config.ini");
    let example = text
        .lines()
        .filter_map(|line| line.strip_prefix("# brokers = "))
        .find(|list| list.contains("tags = "))
        .expect("config.ini shows a broker with tags");
    let config = parse(&format!("[zones.local]\nbrokers = {example}\n")).unwrap();
    let tags: Vec<_> = config
        .local_zone()
        .brokers
        .iter()
        .map(|b| &b.tags)
        .collect();
    assert_eq!(tags, [&Vec::<String>::new(), &vec!["reports".to_string()]]);
}

#[test]
fn plain_and_table_brokers_mix_in_one_list() {
    let text = r#"
[zones.local]
brokers = [
  "amqp://u:p@10.0.0.1:5672/%2f",
  { uri = "amqp://u:p@10.0.0.2:5672/%2f", tags = ["reports", "eu"] },
  { uri = "amqp://u:p@10.0.0.3:5672/%2f" },
  "amqp://u:p@10.0.0.4:5672/%2f",
]
[zones.east]
brokers = [{ uri = "amqp://u:p@10.1.0.1:5672/%2f", tags = ["reports"] }]
"#;
    let config = parse(text).unwrap();
    let local: Vec<_> = config
        .local_zone()
        .brokers
        .iter()
        .map(|b| (b.uri.host(), b.tags.join(",")))
        .collect();
    assert_eq!(
        local,
        [
            ("10.0.0.1", String::new()),
            ("10.0.0.2", "reports,eu".to_string()),
            ("10.0.0.3", String::new()),
            ("10.0.0.4", String::new()),
        ]
    );
    let east = &config.zones[1];
    assert_eq!(east.name, "east");
    assert_eq!(east.brokers[0].tags, ["reports"]);
}

#[test]
fn publisher_values_are_read() {
    let text = format!(
        "{LOCAL_ZONE}[publisher]\ntimeout_ms = 750\nconfirm_window = 64\nnew_traces = false\n"
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config.publisher,
        PublisherConfig {
            timeout: Duration::from_millis(750),
            confirm_window: 64,
            new_traces: false,
        }
    );
    let text = format!("{LOCAL_ZONE}[publisher]\nconfirm_window = 1\n");
    let publisher = parse(&text).unwrap().publisher;
    assert_eq!(publisher.timeout, Duration::from_millis(5000));
    assert_eq!(publisher.confirm_window, 1);
}

#[test]
fn load_reads_the_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.ini");
    std::fs::write(&path, LOCAL_ZONE).unwrap();
    // WARREN_ZONE is not set in the test environment unless someone exports it.
    if std::env::var(ZONE_ENV).is_err() {
        let config = Config::load(&path, KNOWN_APPS).unwrap();
        assert_eq!(config.path, path);
        assert_eq!(config.local_zone().name, "local");
    }
    let missing = dir.path().join("absent.ini");
    let err = Config::load(&missing, KNOWN_APPS).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    let text = err.to_string();
    assert!(text.starts_with(&format!("cannot read config file {}: ", missing.display())));
}

/// The redacted URI and the tags of each broker, to compare configurations.
fn redacted(brokers: &[ConfiguredBroker]) -> Vec<(String, Vec<String>)> {
    brokers
        .iter()
        .map(|b| (b.uri.redacted().to_string(), b.tags.clone()))
        .collect()
}

#[test]
fn a_remote_reconnect_bound_is_never_below_the_local_one() {
    let text = "[amqp]\nreconnect_max_ms = 9000\nremote_reconnect_max_ms = 2000\n[zones.local]\nbrokers = [\"amqp://a:5672/%2f\"]\n";
    let config = Config::parse(text, Path::new("config.ini"), &[], None).unwrap();
    assert_eq!(
        config.amqp.remote_reconnect_max,
        Duration::from_millis(9000)
    );
    let zero =
        "[amqp]\nremote_reconnect_max_ms = 0\n[zones.local]\nbrokers = [\"amqp://a:5672/%2f\"]\n";
    let error = Config::parse(zero, Path::new("config.ini"), &[], None).unwrap_err();
    assert!(
        error.to_string().contains("amqp.remote_reconnect_max_ms"),
        "{error}"
    );
}

// ---------------------------------------------------------------- effective TOML

#[test]
fn effective_toml_is_redacted_and_parses_back() {
    let text = r#"
[amqp]
reconnect_max_ms = 9000
[zones.local]
brokers = ["amqp://admin:s3cr3t@10.0.0.1:5672/%2f", "amqp://admin:s3cr3t@10.0.0.2:5673/prod"]
[zones."far east"]
brokers = ["amqp://x:t0ps3cret@10.9.0.1/%2f"]
[apps.skel]
pool_size = 2
"#;
    let config =
        Config::parse(text, Path::new("/etc/warren/config.ini"), KNOWN_APPS, None).unwrap();
    let effective = config.effective_toml();
    assert!(
        !effective.contains("s3cr3t") && !effective.contains("t0ps3cret"),
        "{effective}"
    );
    let first = effective.lines().next().unwrap();
    assert!(
        first.starts_with('#') && first.contains("/etc/warren/config.ini"),
        "{first}"
    );
    assert!(
        effective.contains("amqp://admin:***@10.0.0.1:5672/%2f"),
        "{effective}"
    );
    assert!(effective.contains("[zones.\"far east\"]"), "{effective}");

    // Same shape: it goes through the same strict reader and gives the same values.
    let again = Config::parse(&effective, Path::new("effective.ini"), KNOWN_APPS, None).unwrap();
    assert_eq!(again.service.node, config.service.node);
    assert_eq!(
        again.service.shutdown_timeout,
        config.service.shutdown_timeout
    );
    assert_eq!(again.amqp.zone, config.amqp.zone);
    assert_eq!(again.amqp.prefetch, config.amqp.prefetch);
    assert_eq!(again.amqp.heartbeat_secs, config.amqp.heartbeat_secs);
    assert_eq!(again.amqp.connect_timeout, config.amqp.connect_timeout);
    assert_eq!(again.amqp.reconnect_min, config.amqp.reconnect_min);
    assert_eq!(again.amqp.reconnect_max, config.amqp.reconnect_max);
    assert_eq!(
        again.amqp.remote_reconnect_max,
        config.amqp.remote_reconnect_max
    );
    assert_eq!(again.amqp.startup_timeout, config.amqp.startup_timeout);
    assert_eq!(again.amqp.prechannels, config.amqp.prechannels);
    assert_eq!(again.pool, config.pool);
    assert_eq!(again.listener, config.listener);
    assert_eq!(again.router, config.router);
    assert_eq!(again.rpc, config.rpc);
    assert_eq!(again.publisher, config.publisher);
    for (a, b) in again.zones.iter().zip(&config.zones) {
        assert_eq!((&a.name, a.local), (&b.name, b.local));
        assert_eq!(redacted(&a.brokers), redacted(&b.brokers));
    }
    assert_eq!(again.zones.len(), config.zones.len());
    let apps = |c: &Config| -> Vec<_> {
        c.apps
            .iter()
            .map(|a| (a.name.clone(), a.enabled, a.pool))
            .collect()
    };
    assert_eq!(apps(&again), apps(&config));

    // And plain toml reads it as a table with exactly the config.ini sections.
    let table: toml::Table = toml::from_str(&effective).unwrap();
    let sections: Vec<_> = table.keys().map(String::as_str).collect();
    assert_eq!(
        sections,
        [
            "amqp",
            "apps",
            "http",
            "listener",
            "pool",
            "publisher",
            "router",
            "rpc",
            "service",
            "zones"
        ]
    );
}

#[test]
fn effective_toml_keeps_broker_tags() {
    let text = r#"
[zones.local]
brokers = ["amqp://admin:s3cr3t@10.0.0.1:5672/%2f", { uri = "amqp://admin:s3cr3t@10.0.0.2:5672/%2f", tags = ["reports", "eu"] }]
[zones.east]
brokers = [{ uri = "amqp://x:s3cr3t@10.9.0.1/%2f", tags = ["reports"] }]
[publisher]
timeout_ms = 1200
confirm_window = 10
"#;
    let config = parse(text).unwrap();
    let effective = config.effective_toml();
    assert!(!effective.contains("s3cr3t"), "{effective}");
    assert!(
        effective.contains(
            "brokers = [\"amqp://admin:***@10.0.0.1:5672/%2f\", \
             { uri = \"amqp://admin:***@10.0.0.2:5672/%2f\", tags = [\"reports\", \"eu\"] }]"
        ),
        "{effective}"
    );
    assert!(
        effective
            .contains("\n[publisher]\ntimeout_ms = 1200\nconfirm_window = 10\nnew_traces = true\n"),
        "{effective}"
    );
    assert!(
        effective.find("[listener]") < effective.find("[publisher]")
            && effective.find("[publisher]") < effective.find("[pool]"),
        "{effective}"
    );

    let again = parse(&effective).unwrap();
    assert_eq!(again.publisher, config.publisher);
    assert_eq!(again.zones.len(), config.zones.len());
    for (a, b) in again.zones.iter().zip(&config.zones) {
        assert_eq!(a.name, b.name);
        assert_eq!(redacted(&a.brokers), redacted(&b.brokers));
    }
}

// ---------------------------------------------------------------- 1. syntax

#[test]
fn syntax_error_is_located() {
    let text = "[amqp]\nprefetch = 50\nheartbeat_secs = = 10\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        3,
        18,
        "amqp.heartbeat_secs",
        "invalid TOML syntax",
    );
    assert!(matches!(refusal.problem, Problem::Syntax { .. }));
    assert!(
        refusal
            .message
            .starts_with("config.ini:3:18: `amqp.heartbeat_secs`: ")
    );
}

#[test]
fn unclosed_array_points_at_its_last_line() {
    let text = "[zones.local]\nbrokers = [\"amqp://u:hunter2@h:5672/%2f\"\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        2,
        41,
        "zones.local.brokers",
        "invalid TOML syntax",
    );
    assert!(!refusal.message.contains("hunter2"), "{}", refusal.message);
}

// ---------------------------------------------------------------- 2. unknown key

#[test]
fn unknown_key_suggests_the_closest() {
    let text = format!("[amqp]\nzone = \"local\"\nprefech = 3\n{LOCAL_ZONE}");
    let refusal = refuse(&text, None);
    assert_eq!(
        refusal.message,
        "config.ini:3:1: `amqp.prefech`: unknown key (did you mean `prefetch`?)"
    );
    assert_at(&refusal, 3, 1, "amqp.prefech", "did you mean `prefetch`?");
}

#[test]
fn unknown_keys_are_found_in_every_section() {
    let text = format!("{LOCAL_ZONE}[apps.skel]\npool_sise = 3\n");
    assert_at(
        &refuse(&text, None),
        4,
        1,
        "apps.skel.pool_sise",
        "did you mean `pool_size`?",
    );

    let text = "[zones.local]\nbroker = [\"amqp://h\"]\n";
    assert_at(
        &refuse(text, None),
        2,
        1,
        "zones.local.broker",
        "did you mean `brokers`?",
    );

    let text = format!("{LOCAL_ZONE}[services]\nnode = \"x\"\n");
    assert_at(
        &refuse(&text, None),
        3,
        2,
        "services",
        "did you mean `service`?",
    );

    let text = format!("{LOCAL_ZONE}[pool]\nflavour = 1\n");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        4,
        1,
        "pool.flavour",
        "expected one of `size`, `overflow`",
    );
}

// ---------------------------------------------------------------- 3. wrong type

#[test]
fn wrong_type_is_located() {
    let text = format!("[amqp]\nprefetch = \"fifty\"\n{LOCAL_ZONE}");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        2,
        12,
        "amqp.prefetch",
        "wrong type: expected an integer from 0 to 65535, found string \"fifty\"",
    );
}

#[test]
fn out_of_range_and_other_types_are_located() {
    let text = format!("[amqp]\nprefetch = 70000\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        12,
        "amqp.prefetch",
        "invalid value integer `70000`",
    );

    let text = format!("[pool]\nsize = -1\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        8,
        "pool.size",
        "a non-negative integer",
    );

    let text = format!("{LOCAL_ZONE}[apps.skel]\nenabled = \"yes\"\n");
    assert_at(
        &refuse(&text, None),
        4,
        11,
        "apps.skel.enabled",
        "expected a boolean",
    );

    let text = format!("[publisher]\nnew_traces = \"no\"\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        14,
        "publisher.new_traces",
        "expected a boolean",
    );

    let text = "[zones.local]\nbrokers = [\"amqp://h:5672\", 5]\n";
    assert_at(
        &refuse(text, None),
        2,
        29,
        "zones.local.brokers[1]",
        "expected a string",
    );

    let text = "[zones.local]\nbrokers = \"amqp://u:hunter2@h:5672\"\n";
    let refusal = refuse(text, None);
    assert_at(&refusal, 2, 11, "zones.local.brokers", "expected an array");
    assert!(!refusal.message.contains("hunter2"), "{}", refusal.message);

    let text = format!("amqp = 3\n{LOCAL_ZONE}");
    assert_at(&refuse(&text, None), 1, 8, "amqp", "expected a table");
}

// ---------------------------------------------------------------- 4. invalid URI

#[test]
fn invalid_uri_is_located_and_redacted() {
    let text = "[zones.local]\nbrokers = [\n  \"amqp://guest:guest@127.0.0.1:5672/%2f\",\n  \"amqp://u:hunter2@host:notaport/%2f\",\n]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        4,
        3,
        "zones.local.brokers[1]",
        "invalid broker URI: `amqp://u:***@host:notaport/%2f` has an invalid port `notaport`",
    );
    assert!(!refusal.message.contains("hunter2"), "{}", refusal.message);
    assert!(!format!("{:?}", refusal.problem).contains("hunter2"));
}

#[test]
fn bad_schemes_and_uris_in_other_zones_are_refused() {
    let text =
        format!("{LOCAL_ZONE}[zones.east]\nbrokers = [\"http://u:hunter2@east:5671/%2f\"]\n");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        4,
        12,
        "zones.east.brokers[0]",
        "only amqp:// and amqps:// are supported",
    );
    assert!(!refusal.message.contains("hunter2"), "{}", refusal.message);

    let text = "[zones.local]\nbrokers = [\"rabbit:5672\"]\n";
    assert_at(
        &refuse(text, None),
        2,
        12,
        "zones.local.brokers[0]",
        "is not an AMQP URI",
    );
}

// ---------------------------------------------------------------- 5. local zone

#[test]
fn local_zone_missing_is_refused() {
    let text = "[zones.east]\nbrokers = [\"amqp://east:5672\"]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        1,
        1,
        "zones.local",
        "this node's zone `local` has no [zones.local] section; the file defines `east`",
    );
    assert!(matches!(
        refusal.problem,
        Problem::LocalZoneMissing {
            from_env: false,
            ..
        }
    ));

    let text = format!("[amqp]\nzone = \"west\"\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        8,
        "zones.west",
        "zone `west` has no [zones.west]",
    );
}

#[test]
fn local_zone_missing_mentions_warren_zone() {
    let refusal = refuse(LOCAL_ZONE, Some("north"));
    assert_at(
        &refusal,
        1,
        1,
        "zones.north",
        "this node's zone `north` (set by WARREN_ZONE) has no [zones.north] section",
    );
}

#[test]
fn local_zone_without_brokers_is_refused() {
    let refusal = refuse("[zones.local]\nbrokers = []\n", None);
    assert_at(
        &refusal,
        2,
        11,
        "zones.local.brokers",
        "zone `local` lists no brokers",
    );

    let refusal = refuse("[amqp]\nprefetch = 5\n[zones.local]\n", None);
    assert_at(
        &refusal,
        3,
        8,
        "zones.local",
        "zone `local` lists no brokers",
    );
}

// ---------------------------------------------------------------- 6. pool size 0

#[test]
fn pool_size_zero_is_refused() {
    let text = format!("{LOCAL_ZONE}[pool]\nsize = 0\n");
    assert_at(
        &refuse(&text, None),
        4,
        8,
        "pool.size",
        "a pool needs at least one worker",
    );

    let text = format!("{LOCAL_ZONE}[apps.skel]\nenabled = false\npool_size = 0\n");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        5,
        13,
        "apps.skel.pool_size",
        "a pool needs at least one worker",
    );
    assert_eq!(refusal.problem, Problem::ZeroPoolSize);
}

// ---------------------------------------------------------------- 7. reconnect range

#[test]
fn reconnect_min_above_max_is_refused() {
    let text = format!("[amqp]\nreconnect_min_ms = 6000\nreconnect_max_ms = 5000\n{LOCAL_ZONE}");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        2,
        20,
        "amqp.reconnect_min_ms",
        "reconnect_min_ms (6000) is greater than reconnect_max_ms (5000)",
    );

    // Against the default maximum too.
    let text = format!("[amqp]\nreconnect_min_ms = 5001\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        20,
        "amqp.reconnect_min_ms",
        "(5000)",
    );

    // A maximum below the default minimum is located at the maximum.
    let text = format!("[amqp]\nreconnect_max_ms = 50\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        20,
        "amqp.reconnect_max_ms",
        "(100) is greater",
    );
}

// ---------------------------------------------------------------- 8. the rest

#[test]
fn unknown_app_suggests_a_known_one() {
    let text = format!("{LOCAL_ZONE}[apps.skell]\npool_size = 2\n");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        3,
        7,
        "apps.skell",
        "`apps.skell`: unknown app (did you mean `skel`?)",
    );

    let text = format!("{LOCAL_ZONE}[apps.billing]\n");
    let refusal = refuse(&text, None);
    assert_at(
        &refusal,
        3,
        7,
        "apps.billing",
        "(expected one of `skel`, `echo`)",
    );
}

#[test]
fn a_broker_listed_twice_is_refused() {
    let text = "[zones.local]\nbrokers = [\"amqp://a:hunter2@rabbit:5672/%2f\"]\n[zones.east]\nbrokers = [\"amqp://b:swordfish@RABBIT/%2f\"]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        4,
        12,
        "zones.east.brokers[0]",
        "this broker is already listed as `zones.local.brokers[0]` on line 2 \
         (same host, port and vhost)",
    );
    assert!(!refusal.message.contains("hunter2") && !refusal.message.contains("swordfish"));

    let text = "[zones.local]\nbrokers = [\"amqp://h:5672/%2f\", \"amqp://h:5673/%2f\", \"amqp://h/%2f\"]\n";
    assert_at(
        &refuse(text, None),
        2,
        54,
        "zones.local.brokers[2]",
        "already listed as `zones.local.brokers[0]`",
    );
}

#[test]
fn zero_values_are_refused() {
    let cases = [
        ("[amqp]\nprefetch = 0\n", "amqp.prefetch", 12),
        (
            "[amqp]\nconnect_timeout_ms = 0\n",
            "amqp.connect_timeout_ms",
            22,
        ),
        (
            "[amqp]\nstartup_timeout_secs = 0\n",
            "amqp.startup_timeout_secs",
            24,
        ),
        (
            "[amqp]\nreconnect_min_ms = 0\n",
            "amqp.reconnect_min_ms",
            20,
        ),
        (
            "[pool]\ncheckout_timeout_ms = 0\n",
            "pool.checkout_timeout_ms",
            23,
        ),
        ("[pool]\nidle_timeout_ms = 0\n", "pool.idle_timeout_ms", 19),
        ("[router]\nbuffer = 0\n", "router.buffer", 10),
        (
            "[amqp]\noperation_timeout_ms = 0\n",
            "amqp.operation_timeout_ms",
            24,
        ),
        (
            "[listener]\nmax_message_bytes = 0\n",
            "listener.max_message_bytes",
            21,
        ),
        (
            "[listener]\ndrain_timeout_ms = 0\n",
            "listener.drain_timeout_ms",
            20,
        ),
        (
            "[listener]\nanonymous_queue_expiry_ms = 0\n",
            "listener.anonymous_queue_expiry_ms",
            29,
        ),
        (
            "[service]\nshutdown_timeout_secs = 0\n",
            "service.shutdown_timeout_secs",
            25,
        ),
        (
            "[apps.skel]\ncheckout_timeout_ms = 0\n",
            "apps.skel.checkout_timeout_ms",
            23,
        ),
        ("[publisher]\ntimeout_ms = 0\n", "publisher.timeout_ms", 14),
        (
            "[publisher]\nconfirm_window = 0\n",
            "publisher.confirm_window",
            18,
        ),
    ];
    for (section, key, column) in cases {
        let text = format!("{section}{LOCAL_ZONE}");
        let refusal = refuse(&text, None);
        assert_at(&refusal, 2, column, key, "must be greater than 0");
        assert_eq!(refusal.problem, Problem::Zero);
    }
}

#[test]
fn zero_is_fine_where_it_means_something() {
    let text =
        format!("[amqp]\nheartbeat_secs = 0\nprechannels = 0\n[pool]\noverflow = 0\n{LOCAL_ZONE}");
    let config = parse(&text).unwrap();
    assert_eq!(config.amqp.heartbeat_secs, 0);
    assert_eq!(config.amqp.prechannels, 0);
    assert_eq!(config.pool.overflow, 0);
}

#[test]
fn an_empty_zone_name_is_refused() {
    let text = format!("{LOCAL_ZONE}[zones.\"\"]\nbrokers = [\"amqp://other:5672\"]\n");
    assert_at(
        &refuse(&text, None),
        3,
        8,
        "zones.\"\"",
        "a zone name must not be empty",
    );

    let text = format!("[amqp]\nzone = \"\"\n{LOCAL_ZONE}");
    assert_at(
        &refuse(&text, None),
        2,
        8,
        "amqp.zone",
        "a zone name must not be empty",
    );
}

// ---------------------------------------------------------------- 9. broker tables and tags

#[test]
fn an_unknown_key_in_a_broker_table_suggests_the_closest() {
    let text = "[zones.local]\nbrokers = [{ uri = \"amqp://h:5672/%2f\", tag = [\"x\"] }]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        2,
        41,
        "zones.local.brokers[0].tag",
        "unknown key (did you mean `tags`?)",
    );
    assert!(matches!(refusal.problem, Problem::UnknownKey { .. }));
}

#[test]
fn a_broker_table_needs_a_uri() {
    let text = "[zones.local]\nbrokers = [{ tags = [\"x\"] }]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        2,
        12,
        "zones.local.brokers[0]",
        "`zones.local.brokers[0]`: missing key `uri`",
    );
    assert_eq!(
        refusal.problem,
        Problem::MissingKey {
            name: "uri".to_string()
        }
    );
}

#[test]
fn empty_tags_and_tags_with_spaces_are_refused() {
    let text =
        "[zones.local]\nbrokers = [{ uri = \"amqp://h:5672/%2f\", tags = [\"ok\", \"\"] }]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        2,
        55,
        "zones.local.brokers[0].tags[1]",
        "a tag must not be empty",
    );
    assert_eq!(refusal.problem, Problem::EmptyTag);

    let text = "[zones.local]\nbrokers = [{ uri = \"amqp://h:5672/%2f\", tags = [\"eu west\"] }]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        2,
        49,
        "zones.local.brokers[0].tags[0]",
        "tag \"eu west\" contains whitespace",
    );
    assert!(matches!(refusal.problem, Problem::TagWithWhitespace { .. }));
}

#[test]
fn wrong_types_in_a_broker_table_are_located() {
    let text = "[zones.local]\nbrokers = [{ uri = \"amqp://h:5672/%2f\", tags = \"reports\" }]\n";
    assert_at(
        &refuse(text, None),
        2,
        48,
        "zones.local.brokers[0].tags",
        "wrong type: expected an array, found string \"reports\"",
    );

    let text = "[zones.local]\nbrokers = [{ uri = \"amqp://h:5672/%2f\", tags = [1] }]\n";
    assert_at(
        &refuse(text, None),
        2,
        49,
        "zones.local.brokers[0].tags[0]",
        "wrong type: expected a string, found integer `1`",
    );

    let text = "[zones.local]\nbrokers = [{ uri = 5 }]\n";
    assert_at(
        &refuse(text, None),
        2,
        20,
        "zones.local.brokers[0].uri",
        "wrong type: expected a string, found integer `5`",
    );

    let text = "[zones.local]\nbrokers = [true]\n";
    assert_at(
        &refuse(text, None),
        2,
        12,
        "zones.local.brokers[0]",
        "wrong type: expected a string or a table, found boolean `true`",
    );
}

#[test]
fn an_invalid_uri_in_a_broker_table_is_located_and_redacted() {
    let text = "[zones.local]\nbrokers = [\"amqp://h:5672/%2f\", { uri = \"amqp://u:hunter2@host:notaport/%2f\", tags = [\"a\"] }]\n";
    let refusal = refuse(text, None);
    assert_at(
        &refusal,
        2,
        41,
        "zones.local.brokers[1].uri",
        "invalid broker URI: `amqp://u:***@host:notaport/%2f` has an invalid port `notaport`",
    );
    assert!(!refusal.message.contains("hunter2"), "{}", refusal.message);
    assert!(!format!("{:?}", refusal.problem).contains("hunter2"));
}

#[test]
fn a_tagged_broker_listed_twice_is_refused() {
    let text = "[zones.local]\nbrokers = [\"amqp://a:pw@rabbit/%2f\", { uri = \"amqp://b:pw@RABBIT:5672/%2f\", tags = [\"a\"] }]\n";
    assert_at(
        &refuse(text, None),
        2,
        46,
        "zones.local.brokers[1].uri",
        "already listed as `zones.local.brokers[0]` on line 2",
    );
}

#[test]
fn http_listen_is_an_address_and_port_or_empty() {
    let on = parse(&format!(
        "{LOCAL_ZONE}[http]\nlisten = \"127.0.0.1:9090\"\n"
    ))
    .expect("valid");
    assert_eq!(
        on.http.listen,
        Some("127.0.0.1:9090".parse().expect("address"))
    );
    assert!(on.effective_toml().contains("listen = \"127.0.0.1:9090\""));
    let off = parse(&format!("{LOCAL_ZONE}[http]\nlisten = \"\"\n")).expect("valid");
    assert_eq!(off.http.listen, None);
    assert_eq!(parse(LOCAL_ZONE).expect("valid").http.listen, None);
    for bad in ["9090", "localhost:9090", "127.0.0.1", "127.0.0.1:99999"] {
        let refusal = refuse(&format!("{LOCAL_ZONE}[http]\nlisten = \"{bad}\"\n"), None);
        assert_eq!(refusal.key, "http.listen", "{bad}");
        assert!(
            refusal.message.contains("IP address and port"),
            "{}",
            refusal.message
        );
    }
}

#[test]
fn an_empty_router_exchange_is_refused() {
    let text = format!("{LOCAL_ZONE}[router]\nexchange = \" \"\n");
    let refusal = refuse(&text, None);
    assert_eq!(refusal.key, "router.exchange");
    assert!(
        refusal.message.contains("must not be empty"),
        "{}",
        refusal.message
    );
}

#[test]
fn a_router_exchange_the_broker_would_refuse_is_a_config_error() {
    for name in ["amq.mine".to_string(), "x".repeat(256)] {
        let text = format!("{LOCAL_ZONE}[router]\nexchange = \"{name}\"\n");
        let refusal = refuse(&text, None);
        assert_eq!(refusal.key, "router.exchange");
        assert_eq!(refusal.problem, Problem::BadExchange(name));
    }
}

#[test]
fn fault_handling_keys_are_read() {
    let text = format!(
        "[amqp]\noperation_timeout_ms = 750\n\
         [listener]\nmax_message_bytes = 1024\ndrain_timeout_ms = 900\n\
         fail_back_watch_ms = 0\nanonymous_queue_expiry_ms = 60000\n\
         [exchanges.targeted]\ndurable = false\n\
         [exchanges.\"callmgr\"]\nauto_delete = true\n{LOCAL_ZONE}"
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.amqp.operation_timeout, Duration::from_millis(750));
    let listener = &config.listener;
    assert_eq!(listener.max_message_bytes, 1024);
    assert_eq!(listener.drain_timeout, Duration::from_millis(900));
    assert_eq!(listener.fail_back_watch, Duration::ZERO, "0 = no watch");
    assert_eq!(listener.anonymous_queue_expiry, Duration::from_secs(60));
    assert_eq!(
        config.exchange("targeted"),
        Some(&ExchangeOverride {
            name: "targeted".to_string(),
            durable: Some(false),
            auto_delete: None,
        })
    );
    assert_eq!(
        config.exchange("callmgr").and_then(|e| e.auto_delete),
        Some(true)
    );
    assert!(config.exchange("echo").is_none());
    let effective = config.effective_toml();
    assert!(
        effective.contains("[exchanges.targeted]\ndurable = false\n"),
        "{effective}"
    );
    assert!(
        effective.contains("operation_timeout_ms = 750"),
        "{effective}"
    );
    let again = parse(&effective).unwrap();
    assert_eq!(again.exchanges, config.exchanges);
    assert_eq!(again.listener, config.listener);
}

#[test]
fn bad_fault_handling_values_are_located() {
    let refusal = refuse(
        &format!("[listener]\nanonymous_queue_expiry_ms = 5000000000\n{LOCAL_ZONE}"),
        None,
    );
    assert_at(&refusal, 2, 29, "listener.anonymous_queue_expiry_ms", "");
    let refusal = refuse(
        &format!("[exchanges.targeted]\ndurable = \"yes\"\n{LOCAL_ZONE}"),
        None,
    );
    assert_at(&refusal, 2, 11, "exchanges.targeted.durable", "wrong type");
    let refusal = refuse(
        &format!("[exchanges.targeted]\ndurabel = true\n{LOCAL_ZONE}"),
        None,
    );
    assert_at(
        &refusal,
        2,
        1,
        "exchanges.targeted.durabel",
        "did you mean `durable`",
    );
    let refusal = refuse(
        &format!("[exchanges.\"\"]\ndurable = true\n{LOCAL_ZONE}"),
        None,
    );
    assert_eq!(refusal.problem, Problem::EmptyExchange);
}

#[test]
fn a_node_name_too_long_for_queue_names_is_refused() {
    let node = |name: &str| format!("# node\n[service]\nnode = \"{name}\"\n{LOCAL_ZONE}");
    let longest = "n".repeat(MAX_NODE_BYTES);
    let config = parse(&node(&longest)).unwrap();
    assert_eq!(config.service.node, longest);
    // Surrounding blanks are trimmed before the length is counted.
    let config = parse(&node(&format!("  {longest} "))).unwrap();
    assert_eq!(config.service.node, longest);

    let refusal = refuse(&node(&"n".repeat(MAX_NODE_BYTES + 1)), None);
    assert_at(
        &refusal,
        3,
        8,
        "service.node",
        "129 bytes long; at most 128",
    );
    assert_eq!(
        refusal.problem,
        Problem::NodeTooLong {
            length: 129,
            limit: 128
        }
    );
    // Bytes, not characters: 65 two-byte characters are 130 bytes.
    let refusal = refuse(&node(&"é".repeat(65)), None);
    assert_eq!(
        refusal.problem,
        Problem::NodeTooLong {
            length: 130,
            limit: 128
        }
    );
    assert!(
        refusal
            .message
            .starts_with("config.ini:3:8: `service.node`: "),
        "{}",
        refusal.message
    );
}

#[test]
fn the_default_node_name_fits_the_limit() {
    let config = parse(LOCAL_ZONE).unwrap();
    assert!(config.service.node.starts_with("warren@"));
    assert!(config.service.node.len() <= MAX_NODE_BYTES);
}

#[test]
fn listener_settings_are_the_sections_a_listener_uses() {
    let config = parse(&format!(
        "[amqp]\nprefetch = 7\noperation_timeout_ms = 1234\n\
         [listener]\nmax_redeliveries = 3\n\
         [exchanges.targeted]\ndurable = false\n{LOCAL_ZONE}"
    ))
    .unwrap();
    let settings = ListenerSettings::from_config(&config);
    assert_eq!(settings.prefetch, 7);
    assert_eq!(settings.operation_timeout, Duration::from_millis(1234));
    assert_eq!(settings.listener, config.listener);
    assert_eq!(settings.listener.max_redeliveries, 3);
    assert_eq!(
        settings.exchange("targeted").and_then(|e| e.durable),
        Some(false)
    );
    assert!(settings.exchange("other").is_none());
}

// ---------------------------------------------------------------- 10. TLS

/// A directory with a self-signed certificate (`cert.pem`, `key.pem`), another key
/// (`other.key`) and a file that is not PEM (`junk.pem`).
fn tls_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["rabbit.test".to_string()]).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("cert.pem", &made.cert.pem());
    write("key.pem", &made.signing_key.serialize_pem());
    write("other.key", &other.serialize_pem());
    write("junk.pem", "not a certificate\n");
    dir
}

const AMQPS_ZONE: &str = "[zones.local]\nbrokers = [\"amqps://guest:guest@127.0.0.1/%2f\"]\n";

fn parse_in(dir: &Path, text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, &dir.join("config.ini"), KNOWN_APPS, None)
}

fn refuse_in(dir: &Path, text: &str) -> Refusal {
    let err = parse_in(dir, text).expect_err("the file should be refused");
    let message = err.to_string();
    match err {
        ConfigError::Invalid {
            line,
            column,
            key,
            problem,
            ..
        } => Refusal {
            line,
            column,
            key,
            problem,
            message,
        },
        ConfigError::Read { .. } => panic!("unexpected read error: {message}"),
    }
}

#[test]
fn tls_files_resolve_next_to_the_config_and_load() {
    let dir = tls_files();
    let text = format!(
        "[tls]\nca_file = \"cert.pem\"\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n{AMQPS_ZONE}"
    );
    let config = parse_in(dir.path(), &text).unwrap();
    let tls = config.tls.as_ref().expect("TLS settings");
    assert_eq!(tls.files().ca_file, Some(dir.path().join("cert.pem")));
    assert_eq!(config.zones[0].brokers[0].uri.port(), 5671);
    let effective = config.effective_toml();
    assert!(effective.contains("[tls]"), "{effective}");
    assert!(effective.contains("key_file"), "{effective}");
    assert!(!effective.contains("guest:guest"), "{effective}");
}

#[test]
fn amqps_without_a_tls_section_uses_the_system_roots_and_plain_amqp_needs_none() {
    let dir = tls_files();
    match parse_in(dir.path(), AMQPS_ZONE) {
        Ok(config) => assert!(config.tls.is_some()),
        // A machine without ca-certificates: the refusal says what to do.
        Err(error) => assert!(error.to_string().contains("set tls.ca_file"), "{error}"),
    }
    assert!(parse_in(dir.path(), LOCAL_ZONE).unwrap().tls.is_none());
}

#[test]
fn a_missing_or_non_pem_ca_file_is_refused_at_its_key() {
    let dir = tls_files();
    let refusal = refuse_in(
        dir.path(),
        &format!("[tls]\nca_file = \"nowhere.pem\"\n{AMQPS_ZONE}"),
    );
    assert_at(&refusal, 2, 11, "tls.ca_file", "cannot read");
    assert!(
        refusal.message.contains("nowhere.pem"),
        "{}",
        refusal.message
    );
    assert!(
        refusal
            .message
            .starts_with(&format!("{}", dir.path().join("config.ini").display()))
    );

    let refusal = refuse_in(
        dir.path(),
        &format!("[tls]\nca_file = \"junk.pem\"\n{AMQPS_ZONE}"),
    );
    assert_at(
        &refusal,
        2,
        11,
        "tls.ca_file",
        "holds no usable PEM certificate",
    );
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let dir = tls_files();
    let text = format!("[tls]\ncert_file = \"cert.pem\"\nkey_file = \"other.key\"\n{AMQPS_ZONE}");
    let refusal = refuse_in(dir.path(), &text);
    assert_at(
        &refusal,
        3,
        12,
        "tls.key_file",
        "does not match the certificate",
    );
    assert!(matches!(
        &refusal.problem,
        Problem::Tls(error) if matches!(**error, crate::tls::TlsError::KeyMismatch { .. })
    ));

    let text = format!("[tls]\ncert_file = \"cert.pem\"\nkey_file = \"junk.pem\"\n{AMQPS_ZONE}");
    assert_at(
        &refuse_in(dir.path(), &text),
        3,
        12,
        "tls.key_file",
        "holds no usable PEM private key",
    );
}

#[test]
fn half_a_client_identity_is_refused() {
    let dir = tls_files();
    let refusal = refuse_in(
        dir.path(),
        &format!("[tls]\ncert_file = \"cert.pem\"\n{AMQPS_ZONE}"),
    );
    assert_at(
        &refusal,
        2,
        13,
        "tls.cert_file",
        "`tls.key_file` is missing",
    );
    let refusal = refuse_in(
        dir.path(),
        &format!("[tls]\nkey_file = \"key.pem\"\n{AMQPS_ZONE}"),
    );
    assert_at(
        &refusal,
        2,
        12,
        "tls.key_file",
        "`tls.cert_file` is missing",
    );
}

#[test]
fn a_server_name_must_be_a_dns_name_or_an_address() {
    let text =
        "[zones.local]\nbrokers = [{ uri = \"amqps://h/%2f\", server_name = \"not a name!\" }]\n";
    let refusal = refuse(text, None);
    assert_eq!(refusal.key, "zones.local.brokers[0].server_name");
    assert!(
        refusal.message.contains("not a DNS name"),
        "{}",
        refusal.message
    );
    let text = "[zones.local]\nbrokers = [{ uri = \"amqps://10.0.0.5/%2f\", server_name = \"rabbit.internal\" }]\n";
    let config = parse(text).unwrap();
    assert_eq!(
        config.zones[0].brokers[0].server_name.as_deref(),
        Some("rabbit.internal")
    );
    assert!(
        config
            .effective_toml()
            .contains("server_name = \"rabbit.internal\"")
    );
}

// ---------------------------------------------------------------- 11. clusters

/// A local zone whose one broker is a three-node cluster, plus `extra` entries.
fn cluster_zone(extra: &str) -> String {
    format!(
        "[zones.local]\nbrokers = [{{ cluster = [\"amqp://u:secret@n1:5672/%2f\", \"amqp://u:secret@n2:5673/%2f\", \"amqp://u:secret@n3:5674/%2f\"], tags = [\"main\"] }}{extra}]\n"
    )
}

#[test]
fn a_cluster_is_one_broker_with_its_members_in_file_order() {
    let config = parse(&cluster_zone("")).unwrap();
    let brokers = &config.zones[0].brokers;
    assert_eq!(brokers.len(), 1, "a cluster is one broker");
    let broker = &brokers[0];
    assert!(broker.cluster);
    let hosts: Vec<&str> = broker.members.iter().map(|m| m.host()).collect();
    assert_eq!(hosts, ["n1", "n2", "n3"]);
    assert_eq!(broker.uri, broker.members[0]);
    assert_eq!(broker.tags, ["main"]);
    // The effective file says the same, with the passwords redacted, and reads back.
    let effective = config.effective_toml();
    assert!(effective.contains("{ cluster = ["), "{effective}");
    assert!(!effective.contains("secret"), "{effective}");
    let again = parse(&effective).unwrap();
    let members: Vec<&str> = again.zones[0].brokers[0]
        .members
        .iter()
        .map(|m| m.host())
        .collect();
    assert_eq!(members, ["n1", "n2", "n3"]);
    // A plain broker is its own single member.
    let plain = parse(LOCAL_ZONE).unwrap();
    let broker = &plain.zones[0].brokers[0];
    assert!(!broker.cluster);
    assert_eq!(broker.members, vec![broker.uri.clone()]);
}

#[test]
fn a_cluster_entry_needs_members_and_not_also_a_uri() {
    let text = "[zones.local]\nbrokers = [{ cluster = [] }]\n";
    let refusal = refuse(text, None);
    assert_eq!(refusal.key, "zones.local.brokers[0]", "{}", refusal.message);
    assert!(
        refusal.message.contains("lists no member"),
        "{}",
        refusal.message
    );
    let text =
        "[zones.local]\nbrokers = [{ uri = \"amqp://a/%2f\", cluster = [\"amqp://b/%2f\"] }]\n";
    let refusal = refuse(text, None);
    assert_eq!(refusal.key, "zones.local.brokers[0]", "{}", refusal.message);
    assert!(refusal.message.contains("not both"), "{}", refusal.message);
}

#[test]
fn a_bad_or_repeated_member_is_refused_at_its_own_key() {
    let text = "[zones.local]\nbrokers = [{ cluster = [\"amqp://u:pw@n1/%2f\", \"amqp://u:hunter2@n2:notaport/%2f\"] }]\n";
    let refusal = refuse(text, None);
    assert_eq!(refusal.key, "zones.local.brokers[0].cluster[1]");
    assert_eq!(refusal.line, 2);
    assert!(matches!(refusal.problem, Problem::InvalidUri(_)));
    assert!(!refusal.message.contains("hunter2"), "{}", refusal.message);

    let text =
        "[zones.local]\nbrokers = [{ cluster = [\"amqp://n1/%2f\", \"amqp://N1:5672/%2f\"] }]\n";
    let refusal = refuse(text, None);
    assert_eq!(refusal.key, "zones.local.brokers[0].cluster[1]");
    assert!(
        refusal
            .message
            .contains("already listed as `zones.local.brokers[0].cluster[0]`"),
        "{}",
        refusal.message
    );

    // A member that is also listed as a broker of its own.
    let refusal = refuse(&cluster_zone(", \"amqp://n2:5673/%2f\""), None);
    assert_eq!(refusal.key, "zones.local.brokers[1]", "{}", refusal.message);
    assert!(matches!(refusal.problem, Problem::DuplicateBroker { .. }));
}

#[test]
fn the_members_of_a_cluster_share_vhost_and_scheme() {
    let text =
        "[zones.local]\nbrokers = [{ cluster = [\"amqp://n1/%2f\", \"amqp://n2/other\"] }]\n";
    let refusal = refuse(text, None);
    assert_eq!(refusal.key, "zones.local.brokers[0].cluster[1]");
    assert_eq!(
        refusal.problem,
        Problem::ClusterMemberDiffers {
            first_key: "zones.local.brokers[0].cluster[0]".to_string(),
            what: "vhost",
        }
    );
    let text = "[zones.local]\nbrokers = [{ cluster = [\"amqp://n1/%2f\", \"amqps://n2/%2f\"] }]\n";
    let refusal = refuse(text, None);
    assert!(refusal.message.contains("scheme"), "{}", refusal.message);
}

#[test]
fn an_app_can_be_told_to_federate() {
    let text = format!("{LOCAL_ZONE}\n[apps.echo]\nfederate = true\n\n[apps.skel]\n");
    let config = parse(&text).unwrap();
    assert!(config.app("echo").is_some_and(|app| app.federate));
    assert!(config.app("skel").is_some_and(|app| !app.federate));
    assert!(config.effective_toml().contains("federate = true"));
}

#[test]
fn an_app_can_have_its_named_queues_declared_as_quorum_queues() {
    let text = format!("{LOCAL_ZONE}\n[apps.echo]\nquorum_queues = true\n\n[apps.skel]\n");
    let config = parse(&text).unwrap();
    assert!(config.app("echo").is_some_and(|app| app.quorum_queues));
    assert!(config.app("skel").is_some_and(|app| !app.quorum_queues));
    let effective = config.effective_toml();
    assert!(effective.contains("quorum_queues = true"), "{effective}");
    assert!(
        parse(&effective)
            .unwrap()
            .app("echo")
            .is_some_and(|app| app.quorum_queues)
    );
    let refusal = refuse(
        &format!("{LOCAL_ZONE}\n[apps.echo]\nquorum_queues = \"yes\"\n"),
        None,
    );
    assert_eq!(
        refusal.key, "apps.echo.quorum_queues",
        "{}",
        refusal.message
    );
}

#[test]
fn rpc_keys_default_to_oslo_names() {
    let config = parse(LOCAL_ZONE).unwrap();
    assert_eq!(config.rpc.server_request_prefix, "exclusive");
    assert_eq!(config.rpc.group_request_prefix, "unicast");
    assert_eq!(config.rpc.broadcast_prefix, "/broadcast/");
    assert_eq!(config.rpc.exchange, "openstack");
    assert_eq!(config.rpc.notifications_exchange, "openstack");
    assert_eq!(
        config.rpc.server_queue_expiry,
        Duration::from_millis(600_000)
    );
}

#[test]
fn rpc_keys_are_read() {
    let text = format!(
        "{LOCAL_ZONE}[rpc]\nserver_request_prefix = \"one\"\ngroup_request_prefix = \"any\"\n\
         broadcast_prefix = \"all.\"\nexchange = \"control\"\n\
         notifications_exchange = \"notes\"\nserver_queue_expiry_ms = 5000\n"
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.rpc.server_request_prefix, "one");
    assert_eq!(config.rpc.group_request_prefix, "any");
    assert_eq!(config.rpc.broadcast_prefix, "all.");
    assert_eq!(config.rpc.exchange, "control");
    assert_eq!(config.rpc.notifications_exchange, "notes");
    assert_eq!(config.rpc.server_queue_expiry, Duration::from_millis(5000));
}

#[test]
fn a_bad_rpc_key_is_named_with_its_line() {
    let lines = LOCAL_ZONE.lines().count();
    for (written, key) in [
        ("server_request_prefix = \"\"", "rpc.server_request_prefix"),
        ("group_request_prefix = \"a.#\"", "rpc.group_request_prefix"),
        ("broadcast_prefix = \"*\"", "rpc.broadcast_prefix"),
        ("exchange = \"amq.topic\"", "rpc.exchange"),
        (
            "notifications_exchange = \" \"",
            "rpc.notifications_exchange",
        ),
        ("server_queue_expiry_ms = 0", "rpc.server_queue_expiry_ms"),
    ] {
        let text = format!("{LOCAL_ZONE}[rpc]\n{written}\n");
        let refusal = refuse(&text, None);
        assert_eq!(refusal.key, key, "{}", refusal.message);
        assert_eq!(refusal.line, lines + 2, "{}", refusal.message);
    }
}

#[test]
fn the_amqp10_transport_reads_its_brokers_and_mapping() {
    let text = "[zones.local]\nbrokers = [\"amqp://guest:guest@127.0.0.1:5672/%2f\"]\n\
        amqp10_brokers = [\"amqp10://guest:s3cr3t@127.0.0.1:5673\", \"amqp10://u:p@h2\", \"amqp10s://u:p@h3\"]\n\
        [rpc]\ntransport = \"amqp10\"\n[rpc.amqp10]\nanycast = \"{address}\"\n";
    let config = parse(text).unwrap();
    assert_eq!(config.rpc.transport, RpcTransport::Amqp10);
    assert_eq!(config.rpc.amqp10.anycast, "{address}");
    assert_eq!(config.rpc.amqp10.multicast, "/exchange/amq.topic/{name}");
    let amqp10 = &config.local_zone().amqp10_brokers;
    assert_eq!(amqp10.len(), 3);
    assert_eq!(amqp10[0].redacted(), "amqp10://guest:***@127.0.0.1:5673");
    assert_eq!((amqp10[0].host(), amqp10[0].port()), ("127.0.0.1", 5673));
    assert_eq!(amqp10[1].port(), 5672);
    // TLS: port 5671 by default, and the [tls] settings are loaded for it.
    assert!(amqp10[2].is_tls() && !amqp10[1].is_tls());
    assert_eq!(amqp10[2].port(), 5671);
    assert_eq!(amqp10[2].redacted(), "amqp10s://u:***@h3");
    assert!(config.tls.is_some());
    let effective = config.effective_toml();
    assert!(!effective.contains("s3cr3t"), "{effective}");
    let again = Config::parse(&effective, Path::new("effective.ini"), KNOWN_APPS, None).unwrap();
    assert_eq!(again.rpc, config.rpc);
    assert_eq!(again.local_zone().amqp10_brokers.len(), 3);
    assert_eq!(
        Amqp10Mapping::apply("/queue/{name}", "exclusive/compute/n1"),
        "/queue/exclusive.compute.n1"
    );
    assert_eq!(
        Amqp10Mapping::apply("{address}", "exclusive/compute/n1"),
        "exclusive/compute/n1"
    );
}

#[test]
fn amqp10_mistakes_are_named_with_their_line() {
    let zone = "[zones.local]\nbrokers = [\"amqp://guest:guest@127.0.0.1:5672/%2f\"]\n";
    // No AMQP 1.0 broker for the transport.
    let refusal = refuse(&format!("{zone}[rpc]\ntransport = \"amqp10\"\n"), None);
    assert_at(&refusal, 4, 13, "rpc.transport", "amqp10_brokers");
    assert!(matches!(refusal.problem, Problem::NoAmqp10Brokers { .. }));
    let refusal = refuse(&format!("{zone}[rpc]\ntransport = \"amqp1\"\n"), None);
    assert_at(&refusal, 4, 13, "rpc.transport", "\"amqp10\"");
    // A 0-9-1 URI where an AMQP 1.0 one belongs, and its password stays out.
    let refusal = refuse(
        &format!("{zone}amqp10_brokers = [\"amqp://u:s3cr3t@h\"]\n"),
        None,
    );
    assert_at(
        &refusal,
        3,
        19,
        "zones.local.amqp10_brokers[0]",
        "not an AMQP 1.0 URI",
    );
    assert!(!refusal.message.contains("s3cr3t"), "{}", refusal.message);
    let refusal = refuse(
        &format!("{zone}amqp10_brokers = [\"amqp10s://h:99999\"]\n"),
        None,
    );
    assert_at(
        &refusal,
        3,
        19,
        "zones.local.amqp10_brokers[0]",
        "amqp10s://h:99999",
    );
    let refusal = refuse(
        &format!("{zone}amqp10_brokers = [\"amqp10://h\", \"amqp10://h:5672\"]\n"),
        None,
    );
    assert_eq!(
        refusal.key, "zones.local.amqp10_brokers[1]",
        "{}",
        refusal.message
    );
    // A template without a placeholder.
    let refusal = refuse(&format!("{zone}[rpc.amqp10]\nreply = \"/queue/r\"\n"), None);
    assert_at(&refusal, 4, 9, "rpc.amqp10.reply", "{address}");
}

// ---------------------------------------------------------------- [apps.event_pusher]

const PUSHER_APPS: &[&str] = &["echo", "event_pusher"];

fn refuse_pusher(text: &str) -> Refusal {
    let err = Config::parse(text, Path::new("config.ini"), PUSHER_APPS, None)
        .expect_err("the file should be refused");
    let message = err.to_string();
    match err {
        ConfigError::Invalid {
            line,
            column,
            key,
            problem,
            ..
        } => Refusal {
            line,
            column,
            key,
            problem,
            message,
        },
        ConfigError::Read { .. } => panic!("unexpected read error: {message}"),
    }
}

#[test]
fn event_pusher_keys_mirror_mongooseim_and_default_to_its_values() {
    let parse = |text: &str| Config::parse(text, Path::new("config.ini"), PUSHER_APPS, None);
    let config = parse(&format!("{LOCAL_ZONE}\n[apps.event_pusher]\n")).unwrap();
    let pusher = &config.app("event_pusher").unwrap().event_pusher;
    assert_eq!(pusher, &EventPusherConfig::default());
    assert_eq!(
        (
            pusher.presence_exchange.name.as_str(),
            pusher.chat_msg_exchange.name.as_str(),
            pusher.chat_msg_exchange.sent_topic.as_str(),
            pusher.groupchat_msg_exchange.recv_topic.as_str(),
            pusher.groupchat_msg_exchange.kind
        ),
        (
            "presence",
            "chat_msg",
            "chat_msg_sent",
            "groupchat_msg_recv",
            PusherExchangeKind::Topic
        )
    );
    let text = format!(
        "{LOCAL_ZONE}\n[apps.event_pusher]\npresence_exchange.name = \"pres\"\n\
         presence_exchange.type = \"direct\"\nchat_msg_exchange.sent_topic = \"out\"\nlanes = 4\n"
    );
    let config = parse(&text).unwrap();
    let pusher = &config.app("event_pusher").unwrap().event_pusher;
    assert_eq!(pusher.presence_exchange.name, "pres");
    assert_eq!(pusher.presence_exchange.kind, PusherExchangeKind::Direct);
    assert_eq!(pusher.chat_msg_exchange.sent_topic, "out");
    assert_eq!(pusher.chat_msg_exchange.recv_topic, "chat_msg_recv");
    assert_eq!(pusher.lanes, 4);
    let effective = config.effective_toml();
    assert!(
        effective.contains("presence_exchange.type = \"direct\""),
        "{effective}"
    );
    let again = parse(&effective).unwrap();
    assert_eq!(&again.app("event_pusher").unwrap().event_pusher, pusher);
}

#[test]
fn event_pusher_mistakes_are_located() {
    let head = format!("{LOCAL_ZONE}\n[apps.event_pusher]\n");
    let line = LOCAL_ZONE.lines().count() + 3;
    let refusal = refuse_pusher(&format!("{head}chat_msg_exchange.type = \"fanout\"\n"));
    assert_at(
        &refusal,
        line,
        26,
        "apps.event_pusher.chat_msg_exchange.type",
        "\"topic\" or \"direct\"",
    );
    let refusal = refuse_pusher(&format!("{head}lane_window = 0\n"));
    assert_eq!(
        refusal.key, "apps.event_pusher.lane_window",
        "{}",
        refusal.message
    );
    let refusal = refuse_pusher(&format!("{head}presence_exchange.sent_topic = \"x\"\n"));
    assert_eq!(
        refusal.key, "apps.event_pusher.presence_exchange.sent_topic",
        "{}",
        refusal.message
    );
    let refusal = refuse_pusher(&format!(
        "{head}groupchat_msg_exchange.recv_topic = \"a.#\"\n"
    ));
    assert_eq!(refusal.line, line, "{}", refusal.message);
    let refusal = refuse_pusher(&format!("{head}chat_msg_exchange.nmae = \"x\"\n"));
    assert!(
        matches!(refusal.problem, Problem::UnknownKey { .. }),
        "{}",
        refusal.message
    );
    // The pusher's keys belong to its section only.
    let refusal = refuse_pusher(&format!("{LOCAL_ZONE}\n[apps.echo]\nlanes = 4\n"));
    assert_eq!(refusal.key, "apps.echo.lanes", "{}", refusal.message);
    assert!(
        refusal.message.contains("belongs to [apps.event_pusher]"),
        "{}",
        refusal.message
    );
    assert_eq!(refusal.line, LOCAL_ZONE.lines().count() + 3);
}

// ---------------------------------------------------------------- [apps.gateway]

const GATEWAY_APPS: &[&str] = &["echo", "gateway"];

#[test]
fn gateway_keys_default_and_round_trip_without_the_secret() {
    let parse = |text: &str| Config::parse(text, Path::new("config.ini"), GATEWAY_APPS, None);
    let config = parse(&format!("{LOCAL_ZONE}\n[apps.gateway]\n")).unwrap();
    let gateway = &config.app("gateway").unwrap().gateway;
    assert_eq!(gateway, &crate::config::GatewayConfig::default());
    assert_eq!(gateway.path, "/ws");
    assert_eq!(gateway.max_frame_bytes, 65536);
    let text = format!(
        "{LOCAL_ZONE}\n[apps.gateway]\npath = \"/socket\"\nqueue_prefix = \"t1.\"\n\
         jwt_secret = \"s3cret-value\"\nidentity_header = \"X-Consumer-Username\"\n\
         trusted_proxies = [\"127.0.0.1\"]\nallowed_origins = [\"https://app.example.com\"]\n\
         max_frames_per_sec = 5\nclient_queue_expiry_ms = 30000\n"
    );
    let config = parse(&text).unwrap();
    let gateway = &config.app("gateway").unwrap().gateway;
    assert_eq!(gateway.path, "/socket");
    assert_eq!(gateway.identity_header, "x-consumer-username");
    assert_eq!(gateway.max_frames_per_sec, 5);
    assert_eq!(gateway.client_queue_expiry, Duration::from_secs(30));
    assert!(!format!("{gateway:?}").contains("s3cret"));
    let effective = config.effective_toml();
    assert!(!effective.contains("s3cret"), "{effective}");
    assert!(effective.contains("path = \"/socket\""), "{effective}");
    let again = parse(&effective).unwrap();
    let again = &again.app("gateway").unwrap().gateway;
    assert_eq!(again.allowed_origins, gateway.allowed_origins);
    assert_eq!(again.trusted_proxies, gateway.trusted_proxies);
}

#[test]
fn gateway_mistakes_are_located() {
    let head = format!("{LOCAL_ZONE}\n[apps.gateway]\n");
    let line = LOCAL_ZONE.lines().count() + 3;
    let refuse = |text: &str| {
        let err = Config::parse(text, Path::new("config.ini"), GATEWAY_APPS, None)
            .expect_err("the file should be refused");
        err.to_string()
    };
    let message = refuse(&format!("{head}max_frame_bytes = 0\n"));
    assert!(
        message.contains(&format!("config.ini:{line}:"))
            && message.contains("apps.gateway.max_frame_bytes"),
        "{message}"
    );
    let message = refuse(&format!("{head}trusted_proxies = [\"proxy.local\"]\n"));
    assert!(
        message.contains("apps.gateway.trusted_proxies") && message.contains("IP address"),
        "{message}"
    );
    let message = refuse(&format!("{head}identity_header = \"x-user\"\n"));
    assert!(message.contains("trusted_proxies"), "{message}");
    let message = refuse(&format!("{head}allowed_origins = [\"app.example.com\"]\n"));
    assert!(
        message.contains("apps.gateway.allowed_origins"),
        "{message}"
    );
    let message = refuse(&format!("{LOCAL_ZONE}\n[apps.echo]\njwt_secret = \"x\"\n"));
    assert!(
        message.contains("apps.echo.jwt_secret")
            && message.contains("belongs to [apps.gateway]")
            && !message.contains("\"x\""),
        "{message}"
    );
}
