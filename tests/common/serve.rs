//! `tenancy serve` as the tests run it: the real binary on a free port, a token key, and
//! GETs with a bearer token and a Host header.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::TestNs;

pub const KEY: &str = "test-key-0123456789abcdef0123456789";
pub const BASE: &str = "blinds.test";

/// A running `tenancy serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_serve(t: &TestNs, extra: &[&str]) -> Server {
    spawn_serve_env(t, extra, &[])
}

pub fn spawn_serve_env(t: &TestNs, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let log = std::env::temp_dir().join(format!("{}-serve.log", t.ns));
    let mut child = t
        .tenancy()
        .args(["serve", "--listen", "127.0.0.1:0", "--base-domain", BASE])
        .args(extra)
        .env("TENANCY_TOKEN_KEY", KEY)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn tenancy serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("tenancy serve prints its address");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "unexpected first line {line:?}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .to_owned();
    Server {
        child,
        url,
        client: reqwest::Client::new(),
    }
}

pub fn token(t: &TestNs, supplier: &str) -> String {
    let out = t
        .tenancy()
        .args(["tokens", "issue", supplier, "--ttl", "1h"])
        .env("TENANCY_TOKEN_KEY", KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Server {
    /// GET `path`, with a token and a Host if given: (status, JSON body).
    pub async fn get(&self, path: &str, token: Option<&str>, host: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(h) = host {
            req = req.header("Host", h);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn metrics(&self) -> String {
        let response = self.client.get(format!("{}/metrics", self.url)).send();
        response.await.unwrap().text().await.unwrap()
    }

    /// A counter's value for one `result` label, from /metrics.
    pub async fn labelled(&self, name: &str, result: &str) -> f64 {
        let label = format!("result=\"{result}\"");
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A counter's value summed over its labels, from /metrics.
    pub async fn counter(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
