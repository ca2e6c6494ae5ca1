//! Fronting a real database: `psql` through the gateway, before and after
//! a knock from the stock client. Needs PostgreSQL on 127.0.0.1:5432 with
//! trust auth for `postgres` (override with PORTCULLIS_TEST_PG=HOST:PORT).

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;

#[test]
fn psql_runs_select_1_through_the_gateway_only_after_a_knock() {
    let upstream = pg_upstream();
    let direct = std::net::TcpStream::connect(&upstream);
    assert!(
        direct.is_ok(),
        "PostgreSQL is not reachable at {upstream}: this test fronts a real database"
    );
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                r#"
[service.pg]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "30s"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}
"#,
                p[3], p[7], p[5]
            )
        })
        .start_on_ports();
    let port = gw.addr("pg").port();
    let before = psql(port, "select 1");
    assert!(before.is_err(), "psql got through before any knock: {before:?}");

    stock_knock(&[
        "-u",
        "127.0.0.1",
        &p[3].to_string(),
        &p[7].to_string(),
        &p[5].to_string(),
    ]);
    gw.wait_grant("pg", "127.0.0.1");
    assert_eq!(psql(port, "select 1").as_deref(), Ok("1"));
    // A session with several round trips and a larger result.
    assert_eq!(
        psql(
            port,
            "select count(*) from generate_series(1, 100000); select repeat('x', 100000) is not null"
        )
        .as_deref(),
        Ok("100000\nt")
    );
}
