//! The Proxmox stand-in behaves like Proxmox where the gateway can tell: checked over real
//! sockets with reqwest (rustls/ring, trusting only the stand-in's CA) and raw TLS/TCP clients.

// clippy.toml allows unwrap inside #[test] functions only; the helpers here are test code too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use zerospice_tests::echo::EchoServer;
use zerospice_tests::pve::{Acl, Fault, PveConfig, PveStandin, TokenCheck, VmStatus};

const WAIT: Duration = Duration::from_secs(5);

fn client(pve: &PveStandin) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(pve.rustls_client_config().unwrap())
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn start(config: PveConfig) -> (PveStandin, reqwest::Client) {
    let pve = PveStandin::start(config).await.unwrap();
    let client = client(&pve);
    (pve, client)
}

/// `GET` with the right token; status and parsed body (Null if not JSON).
async fn get(pve: &PveStandin, c: &reqwest::Client, path: &str) -> (u16, Value) {
    let resp = c
        .get(format!("{}/api2/json{path}", pve.api_url()))
        .header("Authorization", pve.token_header_value())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(
    pve: &PveStandin,
    c: &reqwest::Client,
    path: &str,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let resp = c
        .post(format!("{}/api2/json{path}", pve.api_url()))
        .header("Authorization", pve.token_header_value())
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

struct Raw {
    status: u16,
    reason: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One request over a fresh TLS connection, to see reason phrases and exact bodies.
async fn raw(pve: &PveStandin, method: &str, path: &str, extra_headers: &str, body: &str) -> Raw {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pve.rustls_client_config().unwrap()));
    let tcp = TcpStream::connect(pve.api_addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf))
        .await
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"));
    let status = parts.next().unwrap().parse().unwrap();
    let reason = parts.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    Raw {
        status,
        reason,
        headers,
        body: body.to_owned(),
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a head to the spiceproxy daemon and reads the answer head.
async fn proxy_head(addr: SocketAddr, head: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(WAIT, async {
        while !got.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => got.push(byte[0]),
                _ => break,
            }
        }
    })
    .await
    .unwrap();
    (s, String::from_utf8_lossy(&got).into_owned())
}

/// A CONNECT as remote-viewer (spice-gtk 0.42) sends it.
fn remote_viewer_connect(host: &str, tls_port: u16) -> Vec<u8> {
    format!(
        "CONNECT {host}:{tls_port} HTTP/1.0\r\nHost: {host}:{tls_port}\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n\r\n"
    )
    .into_bytes()
}

async fn spice_ticket(pve: &PveStandin, c: &reqwest::Client, vmid: u32) -> Value {
    let (status, body) = post(pve, c, &format!("/nodes/pve/qemu/{vmid}/spiceproxy"), &[]).await;
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

#[tokio::test]
async fn resources_list_audited_guests_for_the_right_token_only() {
    let (pve, c) = start(PveConfig::example()).await;

    let (status, body) = get(&pve, &c, "/cluster/resources?type=vm").await;
    assert_eq!(status, 200);
    let list = body["data"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["qemu/100", "qemu/101", "qemu/102", "qemu/104", "qemu/105", "lxc/200"],
        "103 has no VM.Audit and must not be listed"
    );
    let win = &list[0];
    assert_eq!(win["type"], "qemu");
    assert_eq!(win["vmid"], 100);
    assert_eq!(win["name"], "win11");
    assert_eq!(win["node"], "pve");
    assert_eq!(win["status"], "running");
    assert_eq!(win["template"], 0);
    assert_eq!(win["tags"], "lab;windows");
    assert!(win.get("pool").is_none());
    for key in [
        "cpu", "mem", "maxmem", "uptime", "maxcpu", "disk", "maxdisk",
    ] {
        assert!(win[key].is_number(), "{key}");
    }
    assert_eq!(list[1]["status"], "stopped");
    assert_eq!(list[3]["node"], "pve2");
    assert_eq!(list[3]["pool"], "lab");
    assert_eq!(list[4]["template"], 1);
    assert_eq!(list[5]["type"], "lxc");

    let (status, body) = get(&pve, &c, "/cluster/resources?type=bogus").await;
    assert_eq!(status, 400);
    assert!(body["errors"]["type"]
        .as_str()
        .unwrap()
        .contains("enumeration"));

    // No header, wrong secret, unknown token, another user: 401 with Proxmox's reasons, no body.
    let missing = raw(&pve, "GET", "/api2/json/cluster/resources", "", "").await;
    assert_eq!(
        (missing.status, missing.reason.as_str()),
        (401, "No ticket")
    );
    assert_eq!(missing.body, "");
    let wrong = format!("Authorization: PVEAPIToken={}=nope\r\n", pve.token_id());
    let wrong = raw(&pve, "GET", "/api2/json/cluster/resources", &wrong, "").await;
    assert_eq!(
        (wrong.status, wrong.reason.as_str()),
        (401, "invalid token value!")
    );
    let other = "Authorization: PVEAPIToken=zerospice@pve!other=x\r\n";
    let other = raw(&pve, "GET", "/api2/json/version", other, "").await;
    assert_eq!(
        (other.status, other.reason.as_str()),
        (401, "no such token 'other' for user 'zerospice@pve'")
    );
    let user = "Authorization: PVEAPIToken=root@pam!gateway=x\r\n";
    let user = raw(&pve, "GET", "/api2/json/version", user, "").await;
    assert_eq!(
        (user.status, user.reason.as_str()),
        (401, "no such user ('root@pam')")
    );
    let resp = c
        .get(format!("{}/api2/json/version", pve.api_url()))
        .header("Authorization", "Bearer something")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    let tokens: Vec<TokenCheck> = pve.calls().iter().map(|c| c.token).collect();
    assert_eq!(
        tokens,
        [
            TokenCheck::Valid,
            TokenCheck::Valid,
            TokenCheck::Missing,
            TokenCheck::Invalid,
            TokenCheck::Invalid,
            TokenCheck::Invalid,
            TokenCheck::Invalid,
        ]
    );
}

#[tokio::test]
async fn status_and_config_need_vm_audit() {
    let (pve, c) = start(PveConfig::example()).await;

    let (status, body) = get(&pve, &c, "/nodes/pve/qemu/100/status/current").await;
    assert_eq!(status, 200);
    let d = &body["data"];
    assert_eq!(d["status"], "running");
    assert_eq!(d["qmpstatus"], "running");
    assert_eq!(d["spice"], 1);
    assert_eq!(d["name"], "win11");
    assert_eq!(d["vmid"], 100);
    assert!(d["uptime"].is_u64());

    let (_, body) = get(&pve, &c, "/nodes/pve/qemu/101/status/current").await;
    assert_eq!(body["data"]["status"], "stopped");
    assert!(body["data"].get("qmpstatus").is_none());
    let (_, body) = get(&pve, &c, "/nodes/pve/qemu/102/status/current").await;
    assert!(body["data"].get("spice").is_none(), "std vga has no SPICE");

    let (status, body) = get(&pve, &c, "/nodes/pve/qemu/100/config").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["vga"], "qxl");
    assert_eq!(body["data"]["name"], "win11");
    assert_eq!(body["data"]["digest"].as_str().unwrap().len(), 40);

    let r = raw(
        &pve,
        "GET",
        "/api2/json/nodes/pve/qemu/103/status/current",
        &format!("Authorization: {}\r\n", pve.token_header_value()),
        "",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.reason, "Permission check failed (/vms/103, VM.Audit)");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["data"], Value::Null);
    assert_eq!(
        body["message"],
        "Permission check failed (/vms/103, VM.Audit)\n"
    );
    assert_eq!(r.headers["content-type"], "application/json;charset=UTF-8");
    assert_eq!(r.headers["server"], "pve-api-daemon/3.0");

    let (status, _) = get(&pve, &c, "/nodes/pve/qemu/103/config").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn spiceproxy_refuses_like_qemu_server() {
    let (pve, c) = start(PveConfig::example()).await;

    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/101/spiceproxy", &[]).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some("VM 101 not running\n"))
    );
    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/102/spiceproxy", &[]).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some("no spice port\n"))
    );
    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/103/spiceproxy", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "Permission check failed (/vms/103, VM.Console)\n"
    );
    let (status, body) = post(
        &pve,
        &c,
        "/nodes/pve/qemu/100/spiceproxy",
        &[("bogus", "1")],
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["errors"]["bogus"].is_string());
    let (status, body) = post(
        &pve,
        &c,
        "/nodes/pve/qemu/100/spiceproxy",
        &[("proxy", "not a host")],
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["errors"]["proxy"].is_string());

    // With VM.Console everywhere: unknown guests, wrong nodes, containers.
    pve.set_privileges(vec![Acl::new("/", &["VM.Audit", "VM.Console"])]);
    let missing = |node: &str, vmid: u32| {
        format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist\n")
    };
    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/999/spiceproxy", &[]).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some(missing("pve", 999).as_str()))
    );
    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/104/spiceproxy", &[]).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some(missing("pve", 104).as_str()))
    );
    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/200/spiceproxy", &[]).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some(missing("pve", 200).as_str()))
    );
    let (status, body) = post(&pve, &c, "/nodes/nope/qemu/100/spiceproxy", &[]).await;
    assert_eq!(status, 596);
    assert_eq!(body["message"], "no such cluster node 'nope'\n");
    let (status, _) = post(&pve, &c, "/nodes/pve2/qemu/104/spiceproxy", &[]).await;
    assert_eq!(status, 200, "another node's VM through this node's API");
    let (status, body) = get(&pve, &c, "/nodes/pve/qemu/abc/status/current").await;
    assert_eq!(status, 400);
    assert!(body["errors"]["vmid"].is_string());
}

#[tokio::test]
async fn spiceproxy_answer_has_the_proxmox_shape() {
    let (pve, c) = start(PveConfig::example()).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let d = spice_ticket(&pve, &c, 100).await;

    let obj = d.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "ca",
            "delete-this-file",
            "host",
            "host-subject",
            "password",
            "proxy",
            "release-cursor",
            "secure-attention",
            "title",
            "tls-port",
            "toggle-fullscreen",
            "type",
        ]
    );
    assert_eq!(d["type"], "spice");
    assert_eq!(d["title"], "VM 100 - win11");
    assert_eq!(d["proxy"], "http://pve:3128");
    assert_eq!(d["tls-port"], 61000, "a JSON number");
    assert_eq!(
        d["delete-this-file"], 1,
        "a JSON number, as Proxmox sends it"
    );
    assert_eq!(d["secure-attention"], "Ctrl+Alt+Ins");
    assert_eq!(d["toggle-fullscreen"], "Shift+F11");
    assert_eq!(d["release-cursor"], "Ctrl+Alt+R");
    assert_eq!(
        d["host-subject"],
        "OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=pve"
    );
    let ca = d["ca"].as_str().unwrap();
    assert!(!ca.contains('\n') && ca.contains("\\n"));
    assert_eq!(ca.replace("\\n", "\n"), pve.ca_pem());

    let password = d["password"].as_str().unwrap();
    assert_eq!(password.len(), 40);
    assert!(password
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    // pvespiceproxy:<8 hex time>:<vmid>:<node>:<port>::<40 hex>
    let host = d["host"].as_str().unwrap();
    let (plain, sig) = host.split_once("::").unwrap();
    let fields: Vec<&str> = plain.split(':').collect();
    assert_eq!(fields.len(), 5, "{host}");
    assert_eq!(fields[0], "pvespiceproxy");
    assert_eq!(fields[1].len(), 8);
    let issued = u64::from_str_radix(fields[1], 16).unwrap();
    assert!(issued >= before && issued <= before + 5);
    assert_eq!(&fields[2..], ["100", "pve", "61000"]);
    assert_eq!(sig.len(), 40);
    assert!(sig
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    let tickets = pve.tickets();
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0].password, password);
    assert_eq!(
        tickets[0]
            .expires_at
            .duration_since(tickets[0].issued_at)
            .unwrap(),
        Duration::from_secs(30)
    );

    // The proxy parameter names the proxy host; IPv6 in brackets. JSON bodies are accepted too.
    let (_, body) = post(
        &pve,
        &c,
        "/nodes/pve/qemu/100/spiceproxy",
        &[("proxy", "gw.example.org")],
    )
    .await;
    assert_eq!(body["data"]["proxy"], "http://gw.example.org:3128");
    let resp = c
        .post(format!(
            "{}/api2/json/nodes/pve/qemu/100/spiceproxy",
            pve.api_url()
        ))
        .header("Authorization", pve.token_header_value())
        .json(&serde_json::json!({ "proxy": "fd00::1" }))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"]["proxy"], "http://[fd00::1]:3128");
    assert_ne!(body["data"]["password"], password, "one-time passwords");
}

#[tokio::test]
async fn connect_with_a_ticket_relays_bytes_both_ways() {
    let echo = EchoServer::start().await.unwrap();
    let mut config = PveConfig::example();
    config.vm_mut(100).unwrap().spice_target = Some(echo.addr());
    config.vm_mut(104).unwrap().spice_target = Some(echo.addr());
    let (pve, c) = start(config).await;

    let d = spice_ticket(&pve, &c, 100).await;
    let host = d["host"].as_str().unwrap();
    let (mut s, head) =
        proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(host, 61000)).await;
    assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let writer = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let reader = tokio::time::timeout(WAIT, r.read_to_end(&mut back));
    let (_, read) = tokio::join!(writer, reader);
    read.unwrap().unwrap();
    assert_eq!(
        back, payload,
        "echoed through the proxy, EOF after our half-close"
    );

    wait_for("the relay to finish", || {
        pve.connects().iter().all(|c| c.closed)
    })
    .await;
    let connects = pve.connects();
    assert_eq!(connects.len(), 1);
    let rec = &connects[0];
    assert_eq!(rec.status, Some(200));
    assert_eq!(rec.vmid, Some(100));
    assert_eq!(rec.target, Some(echo.addr()));
    assert_eq!(
        rec.request_line.as_deref(),
        Some(format!("CONNECT {host}:61000 HTTP/1.0").as_str())
    );
    assert_eq!(rec.host.as_deref(), Some(format!("{host}:61000").as_str()));
    assert_eq!(rec.bytes_to_target, payload.len() as u64);
    assert_eq!(rec.bytes_to_client, payload.len() as u64);
    assert_eq!(echo.half_closes(), 1);

    // Every channel is its own CONNECT with the same ticket; HTTP/1.1 is answered in kind.
    let head11 = format!("CONNECT {host}:61000 HTTP/1.1\r\nHost: {host}:61000\r\n\r\n");
    let (_, head) = proxy_head(pve.spiceproxy_addr(), head11.as_bytes()).await;
    assert_eq!(head, "HTTP/1.1 200 OK\r\n\r\n");

    // Bytes sent right behind the head (a client that does not wait) still arrive.
    let mut eager = remote_viewer_connect(host, 61000);
    eager.extend_from_slice(b"early");
    let (mut s, head) = proxy_head(pve.spiceproxy_addr(), &eager).await;
    assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n");
    let mut five = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut five))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&five, b"early");

    // A VM on another node is reached through the same daemon.
    let (_, body) = post(&pve, &c, "/nodes/pve2/qemu/104/spiceproxy", &[]).await;
    let host = body["data"]["host"].as_str().unwrap();
    assert!(host.contains(":104:pve2:61004::"));
    let (_, head) = proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(host, 61004)).await;
    assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n");
}

#[tokio::test]
async fn bad_tickets_get_401_invalid_ticket() {
    let echo = EchoServer::start().await.unwrap();
    let mut config = PveConfig::example();
    config.vm_mut(100).unwrap().spice_target = Some(echo.addr());
    let (pve, c) = start(config).await;
    let d = spice_ticket(&pve, &c, 100).await;
    let host = d["host"].as_str().unwrap().to_owned();

    let refused = |head: &str| head.starts_with("HTTP/1.0 401 invalid ticket\r\n");
    // A flipped signature character.
    let mut tampered = host.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).unwrap();
    let (_, head) = proxy_head(
        pve.spiceproxy_addr(),
        &remote_viewer_connect(&tampered, 61000),
    )
    .await;
    assert!(refused(&head), "{head}");
    // Another VM's id in a valid-looking ticket.
    let other_vm = host.replacen(":100:", ":101:", 1);
    let (_, head) = proxy_head(
        pve.spiceproxy_addr(),
        &remote_viewer_connect(&other_vm, 61000),
    )
    .await;
    assert!(refused(&head), "{head}");
    // The right ticket, the wrong port.
    let (_, head) = proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(&host, 61001)).await;
    assert!(refused(&head), "{head}");
    // No Host header (the URI alone does not count).
    let no_host = format!("CONNECT {host}:61000 HTTP/1.0\r\n\r\n");
    let (_, head) = proxy_head(pve.spiceproxy_addr(), no_host.as_bytes()).await;
    assert!(refused(&head), "{head}");
    assert!(head.contains("Connection: close\r\n"));

    // An expired ticket, via the fault rather than a 40 s wait.
    pve.set_fault(Fault::ExpiredTickets);
    let expired = spice_ticket(&pve, &c, 100).await;
    let expired = expired["host"].as_str().unwrap();
    let (_, head) = proxy_head(
        pve.spiceproxy_addr(),
        &remote_viewer_connect(expired, 61000),
    )
    .await;
    assert!(refused(&head), "{head}");
    pve.clear_fault();

    wait_for("the refusals to be recorded", || {
        pve.connects().iter().all(|c| c.closed)
    })
    .await;
    let errors: Vec<String> = pve
        .connects()
        .iter()
        .map(|c| c.error.clone().unwrap_or_default())
        .collect();
    assert_eq!(errors.len(), 5);
    assert!(errors[0].contains("signature"));
    assert!(errors[2].contains("port"));
    assert!(errors[3].contains("Host"));
    assert!(errors[4].contains("age"), "{}", errors[4]);
    assert!(pve.connects().iter().all(|c| c.status == Some(401)));
    assert_eq!(echo.connections(), 0, "nothing reached the VM");

    // The original ticket is still good, and reused for a second channel.
    for _ in 0..2 {
        let (_, head) =
            proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(&host, 61000)).await;
        assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n");
    }

    // Stopped VMs and VMs without a listener: the daemon drops the connection without answering.
    pve.update_vm(100, |vm| vm.status = VmStatus::Stopped);
    let (_, head) = proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(&host, 61000)).await;
    assert_eq!(head, "");
}

#[tokio::test]
async fn daemon_survives_garbage_and_oversized_heads() {
    let echo = EchoServer::start().await.unwrap();
    let mut config = PveConfig::example();
    config.vm_mut(100).unwrap().spice_target = Some(echo.addr());
    let (pve, c) = start(config).await;
    let addr = pve.spiceproxy_addr();

    let (_, head) = proxy_head(addr, b"\x16\x03\x01\x02\x00\x01\xff\xfe\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.0 400 "), "{head}");
    let (_, head) = proxy_head(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 501 method 'GET' not available\r\n"),
        "{head}"
    );
    let (_, head) = proxy_head(addr, b"CONNECT x HTTP/2.0\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.0 506 "), "{head}");
    let huge = format!("CONNECT x HTTP/1.0\r\nHost: {}", "a".repeat(64 * 1024));
    let (_, head) = proxy_head(addr, huge.as_bytes()).await;
    assert!(
        head.starts_with("HTTP/1.0 400 http header too large"),
        "{head}"
    );
    // Half a head, then gone.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"CONNECT pvespi").await.unwrap();
    drop(s);

    wait_for("all refusals", || {
        let c = pve.connects();
        c.len() == 5 && c.iter().all(|c| c.closed)
    })
    .await;
    assert_eq!(pve.connects()[4].status, None);

    let d = spice_ticket(&pve, &c, 100).await;
    let (_, head) = proxy_head(
        addr,
        &remote_viewer_connect(d["host"].as_str().unwrap(), 61000),
    )
    .await;
    assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n", "still serving");
}

#[tokio::test]
async fn faults_can_be_injected_and_cleared() {
    let echo = EchoServer::start().await.unwrap();
    let mut config = PveConfig::example();
    config.vm_mut(100).unwrap().spice_target = Some(echo.addr());
    let (pve, c) = start(config).await;
    let auth = format!("Authorization: {}\r\n", pve.token_header_value());

    pve.set_fault(Fault::Unauthorized);
    let r = raw(&pve, "GET", "/api2/json/version", &auth, "").await;
    assert_eq!((r.status, r.reason.as_str()), (401, "invalid token value!"));
    assert_eq!(pve.calls().last().unwrap().token, TokenCheck::Valid);

    pve.set_fault(Fault::ServerError {
        message: "proxy exploded".into(),
    });
    let r = raw(&pve, "GET", "/api2/json/version", &auth, "").await;
    assert_eq!((r.status, r.reason.as_str()), (500, "proxy exploded"));
    assert!(
        r.body.contains(&pve.token_header_value()),
        "the body echoes the Authorization header: {}",
        r.body
    );

    pve.set_fault(Fault::Slow(Duration::from_millis(300)));
    let t = Instant::now();
    let (status, _) = get(&pve, &c, "/version").await;
    assert_eq!(status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    // Scoped to one path: other calls are unaffected.
    pve.set_fault_for(
        "/nodes/pve/qemu/100/spiceproxy",
        Fault::ServerError {
            message: "only here".into(),
        },
    );
    let (status, _) = get(&pve, &c, "/cluster/resources").await;
    assert_eq!(status, 200);
    let (status, _) = post(&pve, &c, "/nodes/pve/qemu/100/spiceproxy", &[]).await;
    assert_eq!(status, 500);

    pve.set_fault(Fault::Malformed);
    let d = spice_ticket(&pve, &c, 100).await;
    assert_eq!(d["tls-port"], "61000");
    assert!(d.get("password").is_none());

    pve.set_fault(Fault::SpiceproxyUnauthorized);
    let d = spice_ticket(&pve, &c, 100).await;
    let host = d["host"].as_str().unwrap();
    let (_, head) = proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(host, 61000)).await;
    assert!(
        head.starts_with("HTTP/1.0 401 invalid ticket\r\n"),
        "{head}"
    );

    pve.add_fault(Fault::Slow(Duration::from_millis(10)), None);
    pve.clear_fault();
    let (_, head) = proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(host, 61000)).await;
    assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n");
    let (status, _) = get(&pve, &c, "/version").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn calls_are_recorded_and_can_be_cleared() {
    let (pve, c) = start(PveConfig::example()).await;
    let _ = get(&pve, &c, "/cluster/resources?type=vm").await;
    let _ = post(
        &pve,
        &c,
        "/nodes/pve/qemu/100/spiceproxy",
        &[("proxy", "gw.example.org")],
    )
    .await;
    let calls = pve.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[0].is("GET", "/cluster/resources"));
    assert_eq!(calls[0].query.as_deref(), Some("type=vm"));
    assert_eq!(calls[0].params["type"], "vm");
    assert_eq!(calls[0].status, 200);
    assert!(calls[1].is("POST", "/nodes/pve/qemu/100/spiceproxy"));
    assert_eq!(calls[1].params["proxy"], "gw.example.org");
    assert_eq!(calls[1].token, TokenCheck::Valid);
    assert!(
        !pve.calls()
            .iter()
            .any(|c| c.method == "POST" && c.api_path() != Some("/nodes/pve/qemu/100/spiceproxy")),
        "nothing else was asked"
    );
    pve.clear_calls();
    assert!(pve.calls().is_empty() && pve.connects().is_empty() && pve.tickets().is_empty());
}

#[tokio::test]
async fn power_actions_run_as_tasks() {
    let mut config = PveConfig::example();
    config.power_delay = Duration::from_millis(300);
    let (pve, c) = start(config).await;

    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/101/status/start", &[]).await;
    assert_eq!(status, 200);
    let upid = body["data"].as_str().unwrap().to_owned();
    assert!(upid.starts_with("UPID:pve:"), "{upid}");
    assert!(
        upid.ends_with(":qmstart:101:zerospice@pve!gateway:"),
        "{upid}"
    );

    let task_path = format!("/nodes/pve/tasks/{upid}/status");
    let (status, body) = get(&pve, &c, &task_path).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["status"], "running");
    assert!(body["data"].get("exitstatus").is_none());
    assert_eq!(body["data"]["user"], "zerospice@pve");
    assert_eq!(body["data"]["tokenid"], "gateway");
    assert_eq!(pve.vm(101).unwrap().status, VmStatus::Stopped);

    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, body) = get(&pve, &c, &task_path).await;
    assert_eq!(body["data"]["status"], "stopped");
    assert_eq!(body["data"]["exitstatus"], "OK");
    assert_eq!(pve.vm(101).unwrap().status, VmStatus::Running);
    let (_, body) = get(&pve, &c, "/nodes/pve/qemu/101/status/current").await;
    assert_eq!(body["data"]["status"], "running");

    // Starting a running VM: the call succeeds, the task fails.
    let (_, body) = post(&pve, &c, "/nodes/pve/qemu/100/status/start", &[]).await;
    let upid = body["data"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, body) = get(&pve, &c, &format!("/nodes/pve/tasks/{upid}/status")).await;
    assert_eq!(body["data"]["exitstatus"], "VM 100 already running");

    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/100/status/shutdown", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(
        &pve,
        &c,
        "/nodes/pve/qemu/100/status/stop",
        &[("skiplock", "1")],
    )
    .await;
    assert_eq!(status, 400, "skiplock is root only");
    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/102/status/start", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "Permission check failed (/vms/102, VM.PowerMgmt)\n"
    );
    let (status, _) = post(&pve, &c, "/nodes/pve/qemu/100/status/hibernate", &[]).await;
    assert_eq!(status, 501);
    let (status, body) = get(&pve, &c, "/nodes/pve/tasks/UPID:bogus/status").await;
    assert_eq!(status, 500);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("unable to parse worker upid"));
}

#[tokio::test]
async fn permissions_endpoint_reports_effective_privileges() {
    let (pve, c) = start(PveConfig::example()).await;
    let (status, body) = get(&pve, &c, "/access/permissions").await;
    assert_eq!(status, 200);
    let d = body["data"].as_object().unwrap();
    let paths: Vec<&str> = d.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "/pool/lab",
            "/vms/100",
            "/vms/101",
            "/vms/102",
            "/vms/104",
            "/vms/105",
            "/vms/200"
        ]
    );
    assert_eq!(
        d["/vms/100"],
        serde_json::json!({ "VM.Audit": 1, "VM.Console": 1, "VM.PowerMgmt": 1 })
    );
    assert_eq!(
        d["/vms/102"],
        serde_json::json!({ "VM.Audit": 1, "VM.Console": 1 })
    );

    let (_, body) = get(&pve, &c, "/access/permissions?path=/vms/103").await;
    assert_eq!(body["data"], serde_json::json!({}));
    let (_, body) = get(&pve, &c, "/access/permissions?path=/vms/100").await;
    assert_eq!(body["data"]["/vms/100"]["VM.Console"], 1);
    let (status, body) = get(&pve, &c, "/access/permissions?userid=root@pam").await;
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "Permission check failed (/access, Sys.Audit)\n"
    );
}

#[tokio::test]
async fn unknown_paths_methods_and_bodies_are_refused_like_pveproxy() {
    let (pve, c) = start(PveConfig::example()).await;
    let auth = format!("Authorization: {}\r\n", pve.token_header_value());

    let (status, body) = get(&pve, &c, "/nodes/pve/frobnicate").await;
    assert_eq!(status, 501);
    assert_eq!(
        body["message"],
        "Method 'GET /nodes/pve/frobnicate' not implemented"
    );
    let r = raw(&pve, "GET", "/index.html", &auth, "").await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (501, "no such file '/index.html'")
    );
    let r = raw(&pve, "PATCH", "/api2/json/version", &auth, "").await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (501, "method 'PATCH' not available")
    );
    let r = raw(&pve, "GET", "/api2/json/version", &auth, "x=1").await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (501, "Unexpected content for method 'GET'")
    );
    let big = "a".repeat(70 * 1024);
    let r = raw(
        &pve,
        "POST",
        "/api2/json/nodes/pve/qemu/100/spiceproxy",
        &auth,
        &big,
    )
    .await;
    assert_eq!((r.status, r.reason.as_str()), (501, "for data too large"));
    let text = format!("{auth}Content-Type: text/plain\r\n");
    let r = raw(
        &pve,
        "POST",
        "/api2/json/nodes/pve/qemu/100/spiceproxy",
        &text,
        "x",
    )
    .await;
    assert_eq!(r.status, 506);
    let r = raw(&pve, "GET", "/api2/json/version", &auth, "").await;
    assert_eq!(r.status, 200);
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["data"]["release"], "8.2");
    // Garbage instead of HTTP inside TLS: the connection ends, the server carries on.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pve.rustls_client_config().unwrap()));
    let tcp = TcpStream::connect(pve.api_addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut sink))
        .await
        .unwrap();
    let (status, _) = get(&pve, &c, "/version").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn certificates_have_the_proxmox_layout() {
    let pve = PveStandin::start(PveConfig::example()).await.unwrap();
    let ca_der = pve.ca_der();
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    let ca_subject: Vec<String> = ca
        .subject()
        .iter_attributes()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ca_subject[0], "Proxmox Virtual Environment");
    assert_eq!(ca_subject[1].len(), 36, "a UUID as OU");
    assert_eq!(ca_subject[2], "PVE Cluster Manager CA");
    assert!(ca.is_ca());

    let node_der = pve.node_cert_der();
    let (_, node) = x509_parser::parse_x509_certificate(&node_der).unwrap();
    assert_eq!(
        node.subject().to_string(),
        "OU=PVE Cluster Node, O=Proxmox Virtual Environment, CN=pve"
    );
    assert_eq!(node.issuer(), ca.subject());
    let sans = node.subject_alternative_name().unwrap().unwrap().value;
    use x509_parser::extensions::GeneralName;
    let sans: Vec<String> = sans
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            GeneralName::DNSName(name) => format!("DNS:{name}"),
            other => format!("{other}"),
        })
        .collect();
    for want in ["IP:[127, 0, 0, 1]", "DNS:localhost", "DNS:pve"] {
        assert!(sans.iter().any(|s| s == want), "{want} in {sans:?}");
    }
    assert_eq!(
        pve.host_subject(),
        "OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=pve"
    );

    let fp = pve.node_cert_sha256_fingerprint();
    assert_eq!(fp.len(), 32 * 3 - 1);
    assert_eq!(fp, fp.to_uppercase());
    assert_eq!(
        fp.replace(':', "").to_lowercase(),
        hex(&pve.node_cert_sha256())
    );

    let dir = tempfile::tempdir().unwrap();
    pve.write_spice_x509_dir(dir.path()).unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    assert_eq!(read("ca-cert.pem"), pve.ca_pem());
    assert_eq!(read("server-cert.pem"), pve.node_cert_pem());
    assert!(read("server-key.pem").starts_with("-----BEGIN PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("server-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A client trusting another stand-in's CA refuses this one.
    let other = PveStandin::start(PveConfig::default()).await.unwrap();
    let stranger = reqwest::Client::builder()
        .use_preconfigured_tls(other.rustls_client_config().unwrap())
        .build()
        .unwrap();
    assert!(stranger
        .get(format!("{}/api2/json/version", pve.api_url()))
        .send()
        .await
        .is_err());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn qmp_socket_gets_set_and_expire_password() {
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("100.qmp");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let qemu = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(serde_json::from_str::<Value>(&line).unwrap());
            w.write_all(b"{\"event\": \"SPICE_CONNECTED\"}\r\n{\"return\": {}}\r\n")
                .await
                .unwrap();
        }
        seen
    });

    let mut config = PveConfig::example();
    config.vm_mut(100).unwrap().qmp_socket = Some(socket.clone());
    config.vm_mut(101).unwrap().qmp_socket = Some(dir.path().join("missing.qmp"));
    config.vm_mut(101).unwrap().status = VmStatus::Running;
    let (pve, c) = start(config).await;
    let d = spice_ticket(&pve, &c, 100).await;
    let seen = tokio::time::timeout(WAIT, qemu).await.unwrap().unwrap();
    assert_eq!(
        seen,
        vec![
            serde_json::json!({ "execute": "qmp_capabilities" }),
            serde_json::json!({ "execute": "set_password", "arguments": { "protocol": "spice", "password": d["password"] } }),
            serde_json::json!({ "execute": "expire_password", "arguments": { "protocol": "spice", "time": "+30" } }),
        ]
    );

    let (status, body) = post(&pve, &c, "/nodes/pve/qemu/101/spiceproxy", &[]).await;
    assert_eq!(status, 500);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("VM 101 qmp command 'connect' failed - "));
}

#[tokio::test]
async fn binary_prints_a_json_line_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("pve.json");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(
        &config_path,
        r#"{"node":"lab1","vms":[{"vmid":100,"name":"a"}],"privileges":[{"path":"/vms","privs":["VM.Audit"]}]}"#,
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_zerospice-pve-standin"))
        .arg("--config")
        .arg(&config_path)
        .arg("--write-ca")
        .arg(&ca_path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt as _;
    tokio::time::timeout(WAIT, lines.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(info["node"], "lab1");
    assert_eq!(info["ca_path"], ca_path.to_str().unwrap());
    assert!(info["spiceproxy"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_file(&ca_path).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let c = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let resp = c
        .get(format!(
            "{}/api2/json/cluster/resources",
            info["api_url"].as_str().unwrap()
        ))
        .header("Authorization", info["token_header"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"][0]["node"], "lab1");

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The x509-dir and the QMP password calls work with a real QEMU, reached through the
/// spiceproxy: TLS verifies against the cluster CA and the SPICE server answers a link message.
/// Skipped when `qemu-system-x86_64` is not installed.
#[tokio::test]
async fn real_qemu_serves_the_node_certificate_through_the_spiceproxy() {
    let qemu_bin = "qemu-system-x86_64";
    if std::process::Command::new(qemu_bin)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: {qemu_bin} not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let x509 = dir.path().join("x509");
    let qmp = dir.path().join("qmp.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = PveConfig::example();
    let vm = config.vm_mut(100).unwrap();
    vm.spice_target = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    vm.qmp_socket = Some(qmp.clone());
    let (pve, c) = start(config).await;
    pve.write_spice_x509_dir(&x509).unwrap();

    let mut qemu = tokio::process::Command::new(qemu_bin)
        .args([
            "-display", "none", "-vga", "qxl", "-m", "64", "-nic", "none",
        ])
        .args(["-object", "secret,id=pw0,data=initial"])
        .arg("-spice")
        .arg(format!(
            "tls-port={port},addr=127.0.0.1,x509-dir={},password-secret=pw0",
            x509.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !(qmp.exists() && TcpStream::connect(("127.0.0.1", port)).await.is_ok()) {
        if let Ok(Some(status)) = qemu.try_wait() {
            let mut err = String::new();
            qemu.stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .await
                .unwrap();
            panic!("qemu exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "qemu did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The spiceproxy call sets and expires the password over real QMP.
    let d = spice_ticket(&pve, &c, 100).await;
    let host = d["host"].as_str().unwrap();
    let (stream, head) =
        proxy_head(pve.spiceproxy_addr(), &remote_viewer_connect(host, 61000)).await;
    assert_eq!(head, "HTTP/1.0 200 OK\r\n\r\n");

    // As remote-viewer with `ca=` and `host-subject=`: trust only the cluster CA.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pve.rustls_client_config().unwrap()));
    let name = rustls_pki_types::ServerName::try_from("pve").unwrap();
    let mut tls = tokio::time::timeout(WAIT, connector.connect(name, stream))
        .await
        .unwrap()
        .unwrap();
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(peer, pve.node_cert_der());

    // SpiceLinkHeader (REDQ 2.2) + SpiceLinkMess for the main channel, no capabilities.
    let mut link = Vec::new();
    link.extend_from_slice(b"REDQ");
    link.extend_from_slice(&2u32.to_le_bytes());
    link.extend_from_slice(&2u32.to_le_bytes());
    link.extend_from_slice(&18u32.to_le_bytes());
    link.extend_from_slice(&0u32.to_le_bytes()); // connection id
    link.extend_from_slice(&[1, 0]); // main channel, id 0
    link.extend_from_slice(&0u32.to_le_bytes());
    link.extend_from_slice(&0u32.to_le_bytes());
    link.extend_from_slice(&18u32.to_le_bytes()); // caps offset
    tls.write_all(&link).await.unwrap();
    let mut magic = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut magic))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&magic, b"REDQ");
}
