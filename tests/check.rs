//! `spike check --config F`, as `nginx -t` and `haproxy -c`: validates the
//! file, reaches Redis when one is configured, reports its durability and
//! the stored sale, and exits 0 or 1 without starting anything.

mod common;

use common::redis::RedisServer;
use common::spike::{remove_config, run, write_config};

fn stdout_and_err(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sale_file(url: Option<&str>, node: std::net::SocketAddr) -> String {
    let mut text = format!(
        "[sale]\nevent = \"check\"\ntotal = 10\nper_user_limit = 1\n\n[[node]]\nname = \"n1\"\nlisten = \"{node}\"\n"
    );
    if let Some(url) = url {
        text.push_str(&format!(
            "\n[redis]\nurl = \"{url}\"\ntimeout = \"500ms\"\n"
        ));
    }
    text
}

#[test]
fn a_good_file_on_a_durable_redis_passes_and_starts_nothing() {
    let redis = RedisServer::start();
    let node = common::free_addr();
    let path = write_config(&sale_file(Some(&redis.url()), node));
    let out = run(&["check", "--config", path.to_str().expect("path")]);
    let text = stdout_and_err(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("syntax is ok"), "{text}");
    assert!(text.contains("not initialised"), "{text}");
    assert!(text.contains("test is successful"), "{text}");
    assert!(
        std::net::TcpStream::connect(node).is_err(),
        "check started a node"
    );
    // Nothing was written to Redis either.
    let mut c = redis.connection().expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).expect("KEYS");
    assert!(keys.is_empty(), "check wrote {keys:?}");
    remove_config(&path);
}

#[test]
fn a_bad_file_fails_naming_the_file_key_and_line() {
    let path = write_config("[sale]\nevent = \"x\"\ntotal = 0\n");
    let out = run(&["check", "--config", path.to_str().expect("path")]);
    let text = stdout_and_err(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(":3:") && text.contains("sale.total"),
        "{text}"
    );
    assert!(text.contains("test failed"), "{text}");
    remove_config(&path);
}

#[test]
fn a_volatile_or_unreachable_redis_fails_and_says_why() {
    let volatile = RedisServer::start_volatile();
    let path = write_config(&sale_file(Some(&volatile.url()), common::free_addr()));
    let out = run(&["check", "--config", path.to_str().expect("path")]);
    let text = stdout_and_err(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("appendonly is off"), "{text}");
    remove_config(&path);

    let nobody = format!("redis://127.0.0.1:{}", common::free_port());
    let path = write_config(&sale_file(Some(&nobody), common::free_addr()));
    let out = run(&["check", "--config", path.to_str().expect("path")]);
    let text = stdout_and_err(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&nobody), "the URL is named: {text}");
    remove_config(&path);
}

#[test]
fn a_stored_sale_that_differs_from_the_file_is_reported() {
    let redis = RedisServer::start();
    let node = common::free_addr();
    let path = write_config(&sale_file(Some(&redis.url()), node));
    let cfg = path.to_str().expect("path");
    assert!(
        run(&["stock", "init", "--trust-client-buyer-ids", "--config", cfg])
            .status
            .success()
    );
    std::fs::write(
        &path,
        sale_file(Some(&redis.url()), node).replace("total = 10\n", "total = 99\n"),
    )
    .expect("write");
    let out = run(&["check", "--config", cfg]);
    let text = stdout_and_err(&out);
    assert!(out.status.success(), "a difference is a warning: {text}");
    assert!(text.contains("[sale] is the store's"), "{text}");
    assert!(text.contains("10 tickets"), "the stored total: {text}");
    remove_config(&path);
}

/// A file of several sales is checked sale by sale over one connection
/// (issue 28; it checked none): each stored sale with its figures, each
/// one not started with the command that starts it, a count of both, and
/// a stored sale whose file figures differ warned of.
#[test]
fn a_file_of_several_sales_checks_each_sale() {
    let redis = RedisServer::start();
    let node = common::free_addr();
    let text = format!(
        "[[sale]]\nevent = \"a\"\ntotal = 10\n\n[[sale]]\nevent = \"b\"\ntotal = 20\n\n\
         [[sale]]\nevent = \"c\"\ntotal = 30\n\n[[node]]\nname = \"n1\"\nlisten = \"{node}\"\n\n\
         [redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let path = write_config(&text);
    let p = path.to_str().expect("path");
    for e in ["a", "b"] {
        let init = run(&[
            "stock",
            "init",
            "--config",
            p,
            "--event",
            e,
            "--trust-client-buyer-ids",
        ]);
        assert!(init.status.success(), "{}", stdout_and_err(&init));
    }
    // The file now says 25 for b: the stored 20 is the sale's.
    std::fs::write(&path, text.replace("total = 20", "total = 25")).expect("rewrite");
    let out = run(&["check", "--config", p]);
    let said = stdout_and_err(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("the sale a is stored: 10 tickets"), "{said}");
    assert!(said.contains("the sale b is stored: 20 tickets"), "{said}");
    assert!(said.contains("warning") && said.contains("25"), "{said}");
    assert!(
        said.contains("the sale c is not initialised: `spike stock init --event c`"),
        "{said}"
    );
    assert!(
        said.contains("3 sales: 2 stored, 1 not initialised"),
        "{said}"
    );
    assert!(said.contains("test is successful"), "{said}");
    remove_config(&path);
}
