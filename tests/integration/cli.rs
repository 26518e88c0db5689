//! The command line on bad input: every problem named with its key and fix.

use crate::support::*;

fn run(args: &[&str], config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let file = TempFile::with_text(config);
    let output = gancho_command()
        .args(args)
        .arg("--config")
        .arg(&file.path)
        .envs(env.iter().copied())
        .env_remove("DATABASE_URL")
        .output()
        .expect("gancho runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn invalid_config_names_each_key() {
    let config = r#"database_url = "${SHOP_DB}"

[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["quantity"]

[[rule]]
name = "low"
source = "stock"
kind = "threshold"
value = "quantty"
below = 10
rearm = 5
event = "inventory.low"

[[rule]]
name = "gone"
source = "warehouse"
kind = "change"
event = "x"

[[endpoint]]
name = "hooks"
url = "ftp://example.invalid/"
secret = "not-a-secret"
events = ["inventory.*"]
timeout = "5 seconds"
"#;
    let (code, output) = run(&["check"], config, &[]);
    assert_eq!(code, 2, "{output}");
    for expected in [
        "database_url: environment variable SHOP_DB is not set or is empty",
        "rule[0] \"low\".value: column \"quantty\" is not captured by source \"stock\"",
        "rule[0] \"low\".rearm: rearm (5) must be at or above the limit (10)",
        "rule[1] \"gone\".source: unknown source \"warehouse\"; use one of the [[source]] names: stock",
        "endpoint[0] \"hooks\".url: \"ftp://example.invalid/\" is not an http:// or https:// URL",
        "endpoint[0] \"hooks\".secret: a secret must start with \"whsec_\"",
        "endpoint[0] \"hooks\".timeout: invalid duration \"5 seconds\"",
    ] {
        assert!(output.contains(expected), "missing {expected:?} in:\n{output}");
    }
}

#[test]
fn unknown_key_is_rejected() {
    let (code, output) = run(
        &["run"],
        "database_url = \"postgres://x\"\n[[source]]\nname = \"a\"\ntable = \"a\"\nkey = [\"id\"]\ncolumn = [\"b\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("unknown field `column`"), "{output}");
}

#[tokio::test]
async fn check_against_live_database() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity text, promised date)")
        .await;
    let config = format!(
        r#"database_url = "{url}"

[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["quantity", "promised", "missing"]

[[source]]
name = "ghost"
table = "shop.ghost"
key = ["id"]

[[rule]]
name = "low"
source = "stock"
kind = "threshold"
value = "quantity"
below = 10
event = "low"

[[rule.enrich]]
name = "extra"
sql = "select * from nowhere where id = $1"
params = ["id"]

[[rule.enrich]]
name = "count"
sql = "select $1::int + $2::int as total"
params = ["id"]

[[endpoint]]
name = "hooks"
url = "http://127.0.0.1:9/"
secret = "{SECRET}"
events = ["*"]
"#,
        url = db.url
    );
    let (code, output) = tokio::task::spawn_blocking(move || run(&["check"], &config, &[]))
        .await
        .unwrap();
    assert_eq!(code, 2, "{output}");
    for expected in [
        "source[0] \"stock\".columns: column \"missing\" does not exist in public.stock; the table has: id, quantity, promised",
        "source[1] \"ghost\".table: table shop.ghost does not exist",
        "rule[0] \"low\".value: column \"quantity\" has type text, but this rule needs a number",
        "rule[0] \"low\".enrich[0].sql: the query does not compile: relation \"nowhere\" does not exist",
        "rule[0] \"low\".enrich[1].params: the query uses 2 parameter(s) but params lists 1",
        "warning: database_url: gancho is not installed in this database yet",
    ] {
        assert!(output.contains(expected), "missing {expected:?} in:\n{output}");
    }
}

#[tokio::test]
async fn install_print_matches_install() {
    let db = TestDb::create().await;
    db.execute("create table \"order\" (id int primary key, state text)")
        .await;
    let config = format!(
        "database_url = \"{}\"\n[[source]]\nname = \"orders\"\ntable = 'public.\"order\"'\nkey = [\"id\"]\ncolumns = [\"state\"]\n",
        db.url
    );
    let (code, script) = tokio::task::spawn_blocking(move || run(&["install", "--print"], &config, &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{script}");
    assert!(
        script.contains("select gancho.watch('orders', 'public.\"order\"', array['id'], array['state'], false);"),
        "{script}"
    );

    db.execute(&script).await;
    db.execute("insert into \"order\" values (1, 'cart')").await;
    assert_eq!(
        db.count("select count(*) from gancho.outbox where source = 'orders'")
            .await,
        1
    );
}

#[tokio::test]
async fn run_without_install_says_what_to_do() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int)")
        .await;
    let config = format!(
        "database_url = \"{}\"\n[[source]]\nname = \"stock\"\ntable = \"stock\"\nkey = [\"id\"]\ncolumns = [\"quantity\"]\n",
        db.url
    );
    let (code, output) = tokio::task::spawn_blocking(move || run(&["run"], &config, &[]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("error: gancho is not installed in this database; run `gancho install --config FILE` first"),
        "{output}"
    );
}

#[test]
fn missing_config_path_is_explained() {
    let output = gancho_command().arg("check").output().expect("gancho runs");
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "error: no config file given: pass --config FILE or set GANCHO_CONFIG"
    );
}

#[test]
fn install_print_needs_no_secrets() {
    let config = "database_url = \"${UNSET_DATABASE}\"\n[[source]]\nname = \"stock\"\ntable = \"stock\"\nkey = [\"id\"]\ncolumns = [\"quantity\"]\n\n[[endpoint]]\nname = \"hooks\"\nurl = \"${UNSET_URL}\"\nsecret = \"${UNSET_SECRET}\"\nevents = [\"*\"]\n";
    let (code, script) = run(&["install", "--print"], config, &[]);
    assert_eq!(code, 0, "{script}");
    assert!(
        script.contains("select gancho.watch('stock', 'public.stock', array['id'], array['quantity'], false);"),
        "{script}"
    );
}

#[test]
fn connection_error_names_server() {
    let config = "database_url = \"postgres://postgres@127.0.0.1:1/shop\"\n";
    let (code, output) = run(&["check"], config, &[]);
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("error: cannot connect to Postgres at 127.0.0.1:1/shop: "),
        "{output}"
    );
}

#[tokio::test]
async fn operator_commands_on_installed_database() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int)")
        .await;
    let config = format!(
        "database_url = \"{}\"\n[[source]]\nname = \"stock\"\ntable = \"stock\"\nkey = [\"id\"]\ncolumns = [\"quantity\"]\n\n[[endpoint]]\nname = \"hooks\"\nurl = \"http://127.0.0.1:9/\"\nsecret = \"{SECRET}\"\nevents = [\"*\"]\n",
        db.url
    );
    let outputs = tokio::task::spawn_blocking(move || {
        let before = run(&["deliveries"], &config, &[]);
        let install = run(&["install"], &config, &[]);
        let disable = run(&["endpoint", "disable", "hooks"], &config, &[]);
        let list = run(&["endpoint", "list"], &config, &[]);
        let unknown = run(&["endpoint", "enable", "nosuch"], &config, &[]);
        let redeliver = run(&["redeliver", "9999"], &config, &[]);
        (before, install, disable, list, unknown, redeliver)
    })
    .await
    .unwrap();
    let (before, install, disable, list, unknown, redeliver) = outputs;

    assert_eq!(before.0, 1, "{}", before.1);
    assert!(
        before.1.contains("gancho is not installed in this database"),
        "{}",
        before.1
    );
    assert_eq!(install.0, 0, "{}", install.1);
    assert_eq!(disable.0, 0, "{}", disable.1);
    assert_eq!(list.0, 0, "{}", list.1);
    assert!(list.1.contains("disabled: disabled by an operator"), "{}", list.1);
    assert_eq!(unknown.0, 1, "{}", unknown.1);
    assert!(
        unknown.1.contains("unknown endpoint \"nosuch\"; the config has: hooks"),
        "{}",
        unknown.1
    );
    assert_eq!(redeliver.0, 1, "{}", redeliver.1);
    assert!(
        redeliver
            .1
            .contains("error: no delivery with id 9999; see `gancho deliveries`"),
        "{}",
        redeliver.1
    );
}

#[tokio::test]
async fn receive_command_checks_signatures() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = gancho_command()
        .args(["receive", "--listen", &format!("127.0.0.1:{port}"), "--secret", SECRET])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("gancho receive starts");

    let body = r#"{"test": 2432232314}"#;
    let post = |signature: &'static str| {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/hooks"))
            .header("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek")
            .header("webhook-timestamp", "1614265330")
            .header("webhook-signature", signature)
            .body(body)
            .send()
    };
    let mut status = None;
    for _ in 0..100 {
        if let Ok(response) = post("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=").await {
            status = Some(response.status().as_u16());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let rejected = post("v1,AAAA").await.map(|response| response.status().as_u16());
    send_signal(&child, libc::SIGTERM);
    let exit = wait_for_exit(&mut child, std::time::Duration::from_secs(5)).await;

    assert_eq!(status, Some(200));
    assert_eq!(rejected.ok(), Some(401));
    assert_eq!(exit.and_then(|status| status.code()), Some(0));
}

/// A DATABASE_URL left in the shell must not point `gancho uninstall` at
/// another database than the config's: only `--database-url` overrides it.
#[tokio::test]
async fn uninstall_ignores_shell_database_url() {
    let shop = TestDb::create().await;
    let other = TestDb::create().await;
    for db in [&shop, &other] {
        db.execute("create table stock (id int primary key, quantity int)")
            .await;
    }
    let config_for = |db: &TestDb| {
        config_text(
            &db.url,
            "http://127.0.0.1:9/",
            "[[source]]\nname = \"stock\"\ntable = \"stock\"\nkey = [\"id\"]\ncolumns = [\"quantity\"]\n",
        )
    };
    install(&shop, &parse_config(&config_for(&shop), &[])).await;
    install(&other, &parse_config(&config_for(&other), &[])).await;

    let file = TempFile::with_text(&config_for(&shop));
    let output = gancho_command()
        .arg("uninstall")
        .arg("--config")
        .arg(&file.path)
        .env("DATABASE_URL", &other.url)
        .output()
        .expect("gancho runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let schemas = "select count(*) from pg_namespace where nspname = 'gancho'";
    assert_eq!(shop.count(schemas).await, 0, "the config's database is uninstalled");
    assert_eq!(other.count(schemas).await, 1, "the shell's database keeps gancho");
}
