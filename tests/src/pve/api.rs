//! The Proxmox API as the stand-in answers it: authentication, routing, permission checks and
//! handlers. No IO: the HTTP layer (`server.rs`) feeds requests in and writes responses out; the
//! one side effect on a real QEMU (QMP `set_password`) is returned as a [`Followup`].
//!
//! Order of checks follows pve-http-server / pve-manager: method, `/api2/<format>`, token, body,
//! route, permission (`check_api2_permissions`), node (`proxyto`), parameters (schema), handler.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq as _;

use super::config::{GuestKind, VmStatus};
use super::perms;
use super::state::{unix_secs, PowerAction, Shared, State, Task, Vm};
use super::{Fault, IssuedTicket, TokenCheck};

pub type Params = BTreeMap<String, String>;

/// What to send back. `message` becomes the reason phrase (its first line) and, for errors with a
/// body, the `message` member, as pve-http-server's JSON formatter does.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub message: Option<String>,
    pub body: Option<Value>,
    pub followup: Option<Followup>,
}

/// Work left for the IO layer after the response was decided.
#[derive(Debug)]
pub enum Followup {
    /// QMP `set_password` + `expire_password +30` on a real QEMU (qemu-server's spiceproxy call).
    SetSpicePassword {
        vmid: u32,
        socket: PathBuf,
        password: String,
    },
}

impl ApiResponse {
    fn data(data: Value) -> Self {
        ApiResponse {
            status: 200,
            message: None,
            body: Some(json!({ "data": data })),
            followup: None,
        }
    }

    /// An error raised inside the API (`die`, `raise`): status, reason and a JSON body.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiResponse {
            status,
            body: Some(json!({ "data": null, "message": message })),
            message: Some(message),
            followup: None,
        }
    }

    /// An error of the HTTP server itself (`$self->error(...)`): status and reason, no body.
    pub fn bare(status: u16, message: impl Into<String>) -> Self {
        ApiResponse {
            status,
            message: Some(message.into()),
            body: None,
            followup: None,
        }
    }

    fn param_error(errors: BTreeMap<String, String>) -> Self {
        let message = "Parameter verification failed.\n".to_owned();
        ApiResponse {
            status: 400,
            body: Some(json!({ "data": null, "errors": errors, "message": message })),
            message: Some(message),
            followup: None,
        }
    }

    fn forbidden(path: &str, privilege: &str) -> Self {
        ApiResponse::error(
            403,
            format!("Permission check failed ({path}, {privilege})\n"),
        )
    }
}

/// `GET`, `POST`, `PUT`, `DELETE` only (`$known_methods`).
pub fn check_method(method: &str) -> Result<(), ApiResponse> {
    match method {
        "GET" | "POST" | "PUT" | "DELETE" => Ok(()),
        other => Err(ApiResponse::bare(
            501,
            format!("method '{other}' not available"),
        )),
    }
}

/// Splits `/api2/json/rel` into `/rel`; other paths are not the API.
pub fn rel_path(full_path: &str) -> Result<String, ApiResponse> {
    let Some(rest) = full_path.strip_prefix("/api2") else {
        return Err(ApiResponse::bare(
            501,
            format!("no such file '{full_path}'"),
        ));
    };
    let rest = rest.trim_start_matches('/');
    let (format, rel) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_format = format.len() >= 2
        && format.starts_with(|c: char| c.is_ascii_lowercase())
        && format
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid_format {
        return Err(ApiResponse::bare(501, "no such uri"));
    }
    if format != "json" {
        return Err(ApiResponse::bare(
            501,
            format!("Unable to find formatter for '{format}'"),
        ));
    }
    Ok(format!("/{rel}"))
}

/// Checks an `Authorization` header like `PVE::AccessControl::verify_token`. `Ok(authid)`, or
/// what was wrong and the 401 reason Proxmox gives.
pub fn check_token(
    shared: &Shared,
    authorization: Option<&str>,
) -> Result<String, (TokenCheck, String)> {
    let no_ticket = |check| Err((check, "No ticket\n".to_owned()));
    let Some(header) = authorization else {
        return no_ticket(TokenCheck::Missing);
    };
    let Some(value) = extract_auth_value(header, "PVEAPIToken").filter(|v| !v.is_empty()) else {
        return no_ticket(TokenCheck::Invalid);
    };
    let invalid = |msg: String| Err((TokenCheck::Invalid, msg));
    let Some((token_id, secret)) = value.rsplit_once('=') else {
        return invalid("no tokenid specified\n".into());
    };
    let Some((user, token_name)) = split_token_id(token_id) else {
        return invalid(format!(
            "'{token_id}' is not a valid token ID - not able to split into user and token parts\n"
        ));
    };
    if token_id != shared.token_id {
        let (known_user, _) = split_token_id(&shared.token_id).unwrap_or_default();
        if user != known_user {
            return invalid(format!("no such user ('{user}')\n"));
        }
        return invalid(format!("no such token '{token_name}' for user '{user}'\n"));
    }
    if !bool::from(secret.as_bytes().ct_eq(shared.token_secret.as_bytes())) {
        return invalid("invalid token value!\n".into());
    }
    Ok(token_id.to_owned())
}

/// `PVE::APIServer::Formatter::extract_auth_value`: `(?:^|\s)KEY(?:=| )([^;]*)`, URI-unescaped.
fn extract_auth_value(header: &str, key: &str) -> Option<String> {
    let mut from = 0;
    while let Some(pos) = header[from..].find(key).map(|p| p + from) {
        let after = pos + key.len();
        let starts_word = pos == 0 || header[..pos].ends_with(char::is_whitespace);
        let sep = header[after..].chars().next();
        if starts_word && matches!(sep, Some('=' | ' ')) {
            let value = &header[after + 1..];
            let value = value.split(';').next().unwrap_or_default();
            return Some(percent_decode(value));
        }
        from = after;
    }
    None
}

/// `USER@REALM!TOKENID` into (`USER@REALM`, `TOKENID`).
fn split_token_id(token_id: &str) -> Option<(&str, &str)> {
    let (user, token) = token_id.rsplit_once('!')?;
    let (name, realm) = user.rsplit_once('@')?;
    let name_ok =
        !name.is_empty() && !name.contains(|c: char| c.is_whitespace() || c == ':' || c == '/');
    let ident = |s: &str| {
        s.len() >= 2
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    (name_ok && ident(realm) && ident(token)).then_some((user, token))
}

/// `%XX` decoding (`uri_unescape`); invalid escapes stay as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The faults that act before authentication: `Unauthorized` and `ServerError`.
pub fn injected_error(
    st: &State,
    full_path: &str,
    authorization: Option<&str>,
) -> Option<ApiResponse> {
    let fault = st.fault(full_path, |f| {
        matches!(f, Fault::Unauthorized | Fault::ServerError { .. })
    })?;
    Some(match fault {
        Fault::ServerError { message } => ApiResponse::error(
            500,
            format!(
                "{message} (request Authorization: {})\n",
                authorization.unwrap_or("<none>")
            ),
        )
        .with_reason(message),
        _ => ApiResponse::bare(401, "invalid token value!\n"),
    })
}

impl ApiResponse {
    /// Keeps the body but sends `reason` as the reason phrase.
    fn with_reason(mut self, reason: &str) -> Self {
        self.message = Some(reason.to_owned());
        self
    }
}

/// Routes an authenticated request.
pub fn dispatch(
    shared: &Shared,
    st: &mut State,
    method: &str,
    rel: &str,
    params: &Params,
    authid: &str,
    now: SystemTime,
) -> ApiResponse {
    st.advance(now);
    let segs: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (method, segs.as_slice()) {
        ("GET", []) => index(params),
        ("GET", ["version"]) => version(params),
        ("GET", ["cluster", "resources"]) => cluster_resources(shared, st, params, now),
        ("GET", ["access", "permissions"]) => access_permissions(st, params, authid),
        ("GET", ["nodes"]) => nodes(shared, st, params),
        ("GET", ["nodes", node, "qemu"]) => qemu_list(shared, st, node, params, now),
        ("GET", ["nodes", node, "qemu", vmid, "status", "current"]) => {
            vm_status(shared, st, node, vmid, params, now)
        }
        ("GET", ["nodes", node, "qemu", vmid, "config"]) => {
            vm_config(shared, st, node, vmid, params)
        }
        ("POST", ["nodes", node, "qemu", vmid, "spiceproxy"]) => {
            spiceproxy(shared, st, node, vmid, params, now)
        }
        ("POST", ["nodes", node, "qemu", vmid, "status", action]) => {
            match PowerAction::parse(action) {
                Some(action) => power(shared, st, node, vmid, action, params, authid, now),
                None => Err(not_implemented(method, rel)),
            }
        }
        ("GET", ["nodes", node, "tasks", upid, "status"]) => {
            task_status(shared, st, node, upid, params, authid, now)
        }
        _ => Err(not_implemented(method, rel)),
    };
    result.unwrap_or_else(|e| e)
}

type Handled = Result<ApiResponse, ApiResponse>;

fn not_implemented(method: &str, rel: &str) -> ApiResponse {
    ApiResponse::error(501, format!("Method '{method} {rel}' not implemented"))
}

fn check_params(params: &Params, allowed: &[&str]) -> Result<(), ApiResponse> {
    let errors: BTreeMap<String, String> = params
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .map(|k| {
            (
                k.clone(),
                "property is not defined in schema and the schema does not allow additional properties"
                    .to_owned(),
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiResponse::param_error(errors))
    }
}

fn root_only(params: &Params, names: &[&str]) -> Result<(), ApiResponse> {
    let errors: BTreeMap<String, String> = params
        .iter()
        .filter(|(k, v)| names.contains(&k.as_str()) && !v.is_empty() && v.as_str() != "0")
        .map(|(k, _)| (k.clone(), "Only root may use this option.".to_owned()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiResponse::param_error(errors))
    }
}

fn require(st: &State, path: &str, privilege: &str) -> Result<(), ApiResponse> {
    if perms::has(&st.acls, path, privilege, |id| st.pool_of(id)) {
        Ok(())
    } else {
        Err(ApiResponse::forbidden(&perms::normalize(path), privilege))
    }
}

fn may(st: &State, path: &str, privilege: &str) -> bool {
    perms::has(&st.acls, path, privilege, |id| st.pool_of(id))
}

/// `proxyto => 'node'`: the node must be a cluster member.
fn require_node(shared: &Shared, st: &State, node: &str) -> Result<(), ApiResponse> {
    if st.cluster_nodes(&shared.node).contains(node) {
        Ok(())
    } else {
        Err(ApiResponse::error(
            596,
            format!("no such cluster node '{node}'\n"),
        ))
    }
}

fn parse_vmid(vmid: &str) -> Result<u32, ApiResponse> {
    vmid.parse::<u32>()
        .ok()
        .filter(|id| (100..=999_999_999).contains(id) && !vmid.starts_with('0'))
        .ok_or_else(|| {
            ApiResponse::param_error(BTreeMap::from([(
                "vmid".to_owned(),
                "invalid format - value does not look like a valid VM ID\n".to_owned(),
            )]))
        })
}

fn missing_config(node: &str, vmid: u32) -> ApiResponse {
    ApiResponse::error(
        500,
        format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist\n"),
    )
}

/// Permission, node, parameters and config of a `/nodes/{node}/qemu/{vmid}/...` call.
fn qemu_call<'s>(
    shared: &Shared,
    st: &'s State,
    node: &str,
    vmid: &str,
    privilege: &str,
    params: &Params,
    allowed: &[&str],
) -> Result<&'s Vm, ApiResponse> {
    require(st, &format!("/vms/{vmid}"), privilege)?;
    require_node(shared, st, node)?;
    check_params(params, allowed)?;
    let vmid = parse_vmid(vmid)?;
    st.qemu_on(node, vmid)
        .ok_or_else(|| missing_config(node, vmid))
}

fn index(params: &Params) -> Handled {
    check_params(params, &[])?;
    let dirs = ["version", "cluster", "nodes", "storage", "access", "pools"];
    Ok(ApiResponse::data(Value::Array(
        dirs.iter().map(|d| json!({ "subdir": d })).collect(),
    )))
}

fn version(params: &Params) -> Handled {
    check_params(params, &[])?;
    Ok(ApiResponse::data(json!({
        "version": "8.2.4",
        "release": "8.2",
        "repoid": "faa83925c9641325",
    })))
}

/// Plausible, stable usage numbers for a guest.
fn usage(vm: &Vm, now: SystemTime) -> Map<String, Value> {
    let running = vm.def.status == VmStatus::Running;
    let maxmem = vm.def.memory_mib * 1024 * 1024;
    let mut m = Map::new();
    let cpu = if running {
        0.01 + f64::from(vm.def.vmid % 7) * 0.003
    } else {
        0.0
    };
    m.insert("cpu".into(), json!(cpu));
    m.insert("maxcpu".into(), json!(vm.def.cores));
    m.insert(
        "mem".into(),
        json!(if running { maxmem / 5 * 2 } else { 0 }),
    );
    m.insert("maxmem".into(), json!(maxmem));
    m.insert("disk".into(), json!(0));
    m.insert("maxdisk".into(), json!(32u64 * 1024 * 1024 * 1024));
    m.insert("uptime".into(), json!(vm.uptime(now)));
    let traffic = if running {
        u64::from(vm.def.vmid) * 4096
    } else {
        0
    };
    for key in ["netin", "netout", "diskread", "diskwrite"] {
        m.insert(key.into(), json!(traffic));
    }
    m
}

fn resource_entry(vm: &Vm, now: SystemTime) -> Value {
    let kind = vm.def.kind.as_str();
    let mut m = Map::new();
    m.insert("id".into(), json!(format!("{kind}/{}", vm.def.vmid)));
    m.insert("type".into(), json!(kind));
    m.insert("vmid".into(), json!(vm.def.vmid));
    m.insert("name".into(), json!(vm.def.name));
    m.insert("node".into(), json!(vm.def.node));
    m.insert("status".into(), json!(vm.def.status.as_str()));
    m.insert("template".into(), json!(u8::from(vm.def.template)));
    if !vm.def.tags.is_empty() {
        m.insert("tags".into(), json!(vm.def.tags.join(";")));
    }
    if let Some(pool) = &vm.def.pool {
        m.insert("pool".into(), json!(pool));
    }
    m.extend(usage(vm, now));
    Value::Object(m)
}

fn node_entry(node: &str, fingerprint: Option<&str>) -> Value {
    let mut v = json!({
        "id": format!("node/{node}"),
        "type": "node",
        "node": node,
        "status": "online",
        "level": "",
        "cpu": 0.031,
        "maxcpu": 8,
        "mem": 6_442_450_944u64,
        "maxmem": 34_359_738_368u64,
        "disk": 10_737_418_240u64,
        "maxdisk": 107_374_182_400u64,
        "uptime": 864_000,
    });
    if let (Some(fp), Some(obj)) = (fingerprint, v.as_object_mut()) {
        obj.insert("ssl_fingerprint".into(), json!(fp));
    }
    v
}

fn cluster_resources(shared: &Shared, st: &State, params: &Params, now: SystemTime) -> Handled {
    check_params(params, &["type"])?;
    let kind = params.get("type").map(String::as_str);
    if let Some(k) = kind {
        if !["vm", "storage", "node", "sdn"].contains(&k) {
            return Err(ApiResponse::param_error(BTreeMap::from([(
                "type".to_owned(),
                format!(
                    "value '{k}' does not have a value in the enumeration 'vm, storage, node, sdn'"
                ),
            )])));
        }
    }
    let mut out = Vec::new();
    if kind.is_none() || kind == Some("vm") {
        for vm in st.vms.values() {
            if may(st, &format!("/vms/{}", vm.def.vmid), "VM.Audit") {
                out.push(resource_entry(vm, now));
            }
        }
    }
    if kind.is_none() || kind == Some("node") {
        for node in st.cluster_nodes(&shared.node) {
            if may(st, &format!("/nodes/{node}"), "Sys.Audit") {
                out.push(node_entry(&node, None));
            }
        }
    }
    Ok(ApiResponse::data(Value::Array(out)))
}

fn access_permissions(st: &State, params: &Params, authid: &str) -> Handled {
    check_params(params, &["userid", "path"])?;
    let userid = params.get("userid").map_or(authid, String::as_str);
    if userid != authid {
        require(st, "/access", "Sys.Audit")?;
    }
    let pool_of = |id| st.pool_of(id);
    let as_json = |privs: BTreeMap<String, bool>| -> Value {
        Value::Object(
            privs
                .into_iter()
                .map(|(p, propagate)| (p, json!(u8::from(propagate))))
                .collect(),
        )
    };
    if userid != authid {
        // The stand-in knows only its own token's ACL.
        return Ok(ApiResponse::data(json!({})));
    }
    if let Some(path) = params.get("path") {
        let privs = perms::privileges_at(&st.acls, path, pool_of);
        let mut out = Map::new();
        if !privs.is_empty() {
            out.insert(path.clone(), as_json(privs));
        }
        return Ok(ApiResponse::data(Value::Object(out)));
    }
    let pooled: Vec<u32> = st
        .vms
        .values()
        .filter(|vm| vm.def.pool.is_some())
        .map(|vm| vm.def.vmid)
        .collect();
    let eff = perms::effective(&st.acls, &pooled, pool_of);
    Ok(ApiResponse::data(Value::Object(
        eff.into_iter()
            .map(|(path, privs)| (path, as_json(privs)))
            .collect(),
    )))
}

fn nodes(shared: &Shared, st: &State, params: &Params) -> Handled {
    check_params(params, &[])?;
    let fp = super::certs::colon_hex(&shared.pki.node_cert_sha256());
    let out = st
        .cluster_nodes(&shared.node)
        .into_iter()
        .map(|node| {
            let own = (node == shared.node).then_some(fp.as_str());
            node_entry(&node, own)
        })
        .collect();
    Ok(ApiResponse::data(Value::Array(out)))
}

fn qemu_status_object(vm: &Vm, now: SystemTime) -> Map<String, Value> {
    let running = vm.def.status == VmStatus::Running;
    let mut m = Map::new();
    m.insert("vmid".into(), json!(vm.def.vmid));
    m.insert("name".into(), json!(vm.def.name));
    m.insert("status".into(), json!(vm.def.status.as_str()));
    m.insert("cpus".into(), json!(vm.def.cores));
    if running {
        m.insert("qmpstatus".into(), json!("running"));
        m.insert("pid".into(), json!(10_000 + vm.def.vmid));
        m.insert("running-machine".into(), json!("pc-i440fx-8.1+pve0"));
        m.insert("running-qemu".into(), json!("8.1.5"));
    }
    if !vm.def.tags.is_empty() {
        m.insert("tags".into(), json!(vm.def.tags.join(";")));
    }
    if vm.def.template {
        m.insert("template".into(), json!(1));
    }
    m.extend(usage(vm, now));
    m.remove("maxcpu");
    m
}

fn qemu_list(shared: &Shared, st: &State, node: &str, params: &Params, now: SystemTime) -> Handled {
    require_node(shared, st, node)?;
    check_params(params, &["full"])?;
    let out = st
        .vms
        .values()
        .filter(|vm| vm.def.kind == GuestKind::Qemu && vm.def.node == node)
        .filter(|vm| may(st, &format!("/vms/{}", vm.def.vmid), "VM.Audit"))
        .map(|vm| Value::Object(qemu_status_object(vm, now)))
        .collect();
    Ok(ApiResponse::data(Value::Array(out)))
}

fn vm_status(
    shared: &Shared,
    st: &State,
    node: &str,
    vmid: &str,
    params: &Params,
    now: SystemTime,
) -> Handled {
    let vm = qemu_call(shared, st, node, vmid, "VM.Audit", params, &[])?;
    let mut m = qemu_status_object(vm, now);
    m.insert("ha".into(), json!({ "managed": 0 }));
    if vm.def.has_spice() {
        m.insert("spice".into(), json!(1));
    }
    Ok(ApiResponse::data(Value::Object(m)))
}

fn vm_config(shared: &Shared, st: &State, node: &str, vmid: &str, params: &Params) -> Handled {
    let vm = qemu_call(
        shared,
        st,
        node,
        vmid,
        "VM.Audit",
        params,
        &["current", "snapshot"],
    )?;
    let d = &vm.def;
    let mut m = Map::new();
    m.insert("name".into(), json!(d.name));
    m.insert("memory".into(), json!(d.memory_mib.to_string()));
    m.insert("cores".into(), json!(d.cores));
    m.insert("sockets".into(), json!(1));
    m.insert("ostype".into(), json!("l26"));
    m.insert("boot".into(), json!("order=scsi0;net0"));
    m.insert("scsihw".into(), json!("virtio-scsi-single"));
    m.insert(
        "scsi0".into(),
        json!(format!(
            "local-lvm:vm-{}-disk-0,iothread=1,size=32G",
            d.vmid
        )),
    );
    m.insert(
        "net0".into(),
        json!(format!(
            "virtio=BC:24:11:00:{:02X}:{:02X},bridge=vmbr0",
            (d.vmid >> 8) & 0xff,
            d.vmid & 0xff
        )),
    );
    m.insert(
        "smbios1".into(),
        json!(format!("uuid=00000000-0000-4000-8000-{:012x}", d.vmid)),
    );
    if !d.vga.is_empty() {
        m.insert("vga".into(), json!(d.vga));
    }
    if !d.tags.is_empty() {
        m.insert("tags".into(), json!(d.tags.join(";")));
    }
    if d.template {
        m.insert("template".into(), json!(1));
    }
    let text = serde_json::to_string(&m).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
    m.insert("digest".into(), json!(hex::encode(digest.as_ref())));
    Ok(ApiResponse::data(Value::Object(m)))
}

fn spiceproxy(
    shared: &Shared,
    st: &mut State,
    node: &str,
    vmid: &str,
    params: &Params,
    now: SystemTime,
) -> Handled {
    let vm = qemu_call(shared, st, node, vmid, "VM.Console", params, &["proxy"])?;
    let vmid = vm.def.vmid;
    let proxy_host = match params.get("proxy") {
        Some(p) if valid_address(p) => p.clone(),
        Some(p) => {
            return Err(ApiResponse::param_error(BTreeMap::from([(
                "proxy".to_owned(),
                format!("invalid format - value does not look like a valid address: {p}\n"),
            )])))
        }
        None => node.to_owned(),
    };
    if vm.def.status != VmStatus::Running {
        return Err(ApiResponse::error(500, format!("VM {vmid} not running\n")));
    }
    if !vm.def.has_spice() {
        return Err(ApiResponse::error(500, "no spice port\n"));
    }
    let tls_port = vm.def.tls_port;
    let name = vm.def.name.clone();
    let qmp_socket = vm.def.qmp_socket.clone();
    let expired = st.has_fault(|f| matches!(f, Fault::ExpiredTickets));
    let malformed = st
        .fault(
            &format!("/api2/json/nodes/{node}/qemu/{vmid}/spiceproxy"),
            |f| matches!(f, Fault::Malformed),
        )
        .is_some();

    let issued = unix_secs(now).saturating_sub(if expired { 60 } else { 0 });
    let host = shared.ticket_key.issue(issued, vmid, node, tls_port);
    let password = hex::encode(super::random_bytes::<20>());
    let mut title = format!("VM {vmid}");
    if !name.is_empty() {
        title.push_str(" - ");
        title.push_str(&name);
    }
    let proxy_host = if proxy_host.parse::<Ipv6Addr>().is_ok() {
        format!("[{proxy_host}]")
    } else {
        proxy_host
    };
    let proxy = format!("http://{proxy_host}:3128");
    st.tickets.push(IssuedTicket {
        vmid,
        node: node.to_owned(),
        host: host.clone(),
        password: password.clone(),
        tls_port,
        proxy: proxy.clone(),
        issued_at: now,
        expires_at: now + std::time::Duration::from_secs(30),
    });

    let ca = shared.pki.ca_pem.replace('\n', "\\n");
    let mut data = json!({
        "type": "spice",
        "title": title,
        "host": host,
        "proxy": proxy,
        "tls-port": tls_port,
        "password": password,
        "ca": ca,
        "host-subject": shared.pki.host_subject,
        "delete-this-file": 1,
        "secure-attention": "Ctrl+Alt+Ins",
        "toggle-fullscreen": "Shift+F11",
        "release-cursor": "Ctrl+Alt+R",
    });
    if malformed {
        if let Some(obj) = data.as_object_mut() {
            obj.insert("tls-port".into(), json!(tls_port.to_string()));
            obj.remove("password");
        }
    }
    let mut response = ApiResponse::data(data);
    response.followup = qmp_socket.map(|socket| Followup::SetSpicePassword {
        vmid,
        socket,
        password,
    });
    Ok(response)
}

/// The `address` format: an IP address or a DNS name.
fn valid_address(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[allow(clippy::too_many_arguments)]
fn power(
    shared: &Shared,
    st: &mut State,
    node: &str,
    vmid: &str,
    action: PowerAction,
    params: &Params,
    authid: &str,
    now: SystemTime,
) -> Handled {
    let (allowed, root): (&[&str], &[&str]) = match action {
        PowerAction::Start => (
            &[
                "skiplock",
                "stateuri",
                "migratedfrom",
                "migration_type",
                "migration_network",
                "machine",
                "force-cpu",
                "targetstorage",
                "timeout",
            ],
            &[
                "skiplock",
                "stateuri",
                "migratedfrom",
                "migration_type",
                "migration_network",
                "force-cpu",
                "targetstorage",
            ],
        ),
        PowerAction::Shutdown => (
            &["skiplock", "timeout", "forceStop", "keepActive"],
            &["skiplock", "keepActive"],
        ),
        PowerAction::Stop => (
            &[
                "skiplock",
                "migratedfrom",
                "timeout",
                "keepActive",
                "overrule-shutdown",
            ],
            &["skiplock", "migratedfrom", "keepActive"],
        ),
        PowerAction::Reboot => (&["timeout"], &[]),
    };
    let vm = qemu_call(shared, st, node, vmid, "VM.PowerMgmt", params, allowed)?;
    root_only(params, root)?;
    let vmid = vm.def.vmid;
    let running = vm.def.status == VmStatus::Running;
    if action == PowerAction::Reboot && !running {
        return Err(ApiResponse::error(500, format!("VM {vmid} not running\n")));
    }
    // Errors found by the worker end the task with `TASK ERROR: ...`, the call itself succeeds.
    let outcome = match action {
        PowerAction::Start if vm.def.template => {
            Err("you can't start a vm if it's a template".to_owned())
        }
        PowerAction::Start if running => Err(format!("VM {vmid} already running")),
        _ => Ok(()),
    };
    let pid = st.next_pid;
    st.next_pid = st.next_pid.wrapping_add(7);
    let starttime = unix_secs(now);
    let pstart = 0x0100_0000u32.wrapping_add(pid);
    let upid = format!(
        "UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{}:{vmid}:{authid}:",
        action.task_type()
    );
    st.tasks.insert(
        upid.clone(),
        Task {
            upid: upid.clone(),
            node: node.to_owned(),
            pid,
            pstart,
            starttime,
            vmid,
            action,
            authid: authid.to_owned(),
            ends_at: now + shared.power_delay,
            outcome,
            applied: false,
        },
    );
    st.advance(now);
    Ok(ApiResponse::data(json!(upid)))
}

/// `PVE::UPID::decode`'s pattern.
fn valid_upid(upid: &str) -> bool {
    let Some(rest) = upid.strip_prefix("UPID:").and_then(|r| r.strip_suffix(':')) else {
        return false;
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let hex_len = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    parts.len() == 7
        && !parts[0].is_empty()
        && hex_len(parts[1], &[8])
        && hex_len(parts[2], &[8, 9])
        && hex_len(parts[3], &[8])
        && !parts[4].is_empty()
        && !parts[6].is_empty()
}

fn task_status(
    shared: &Shared,
    st: &State,
    node: &str,
    upid: &str,
    params: &Params,
    authid: &str,
    now: SystemTime,
) -> Handled {
    require_node(shared, st, node)?;
    check_params(params, &[])?;
    if !valid_upid(upid) {
        return Err(ApiResponse::error(
            500,
            format!("unable to parse worker upid '{upid}'\n"),
        ));
    }
    let Some(task) = st.tasks.get(upid).filter(|t| t.node == node) else {
        return Err(ApiResponse::error(500, "no such task\n"));
    };
    if task.authid != authid {
        require(st, &format!("/nodes/{node}"), "Sys.Audit")?;
    }
    let (user, tokenid) = task
        .authid
        .split_once('!')
        .map_or((task.authid.as_str(), None), |(u, t)| (u, Some(t)));
    let mut m = Map::new();
    m.insert("upid".into(), json!(task.upid));
    m.insert("node".into(), json!(task.node));
    m.insert("pid".into(), json!(task.pid));
    m.insert("pstart".into(), json!(task.pstart));
    m.insert("starttime".into(), json!(task.starttime));
    m.insert("type".into(), json!(task.action.task_type()));
    m.insert("id".into(), json!(task.vmid.to_string()));
    m.insert("user".into(), json!(user));
    if let Some(t) = tokenid {
        m.insert("tokenid".into(), json!(t));
    }
    if now < task.ends_at {
        m.insert("status".into(), json!("running"));
    } else {
        m.insert("status".into(), json!("stopped"));
        let exit = match &task.outcome {
            Ok(()) => "OK".to_owned(),
            Err(e) => e.clone(),
        };
        m.insert("exitstatus".into(), json!(exit));
    }
    Ok(ApiResponse::data(Value::Object(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_value_extraction_follows_the_formatter() {
        assert_eq!(
            extract_auth_value("PVEAPIToken=a@pve!t=s", "PVEAPIToken").as_deref(),
            Some("a@pve!t=s")
        );
        assert_eq!(
            extract_auth_value("PVEAPIToken a@pve!t=s;x", "PVEAPIToken").as_deref(),
            Some("a@pve!t=s")
        );
        assert_eq!(extract_auth_value("XPVEAPIToken=a", "PVEAPIToken"), None);
        assert_eq!(
            extract_auth_value("Bearer x PVEAPIToken=a%21b", "PVEAPIToken").as_deref(),
            Some("a!b")
        );
        assert_eq!(extract_auth_value("PVEAPIToken", "PVEAPIToken"), None);
        assert_eq!(extract_auth_value("Basic abc", "PVEAPIToken"), None);
    }

    #[test]
    fn token_ids_split_into_user_and_token() {
        assert_eq!(
            split_token_id("zerospice@pve!gateway"),
            Some(("zerospice@pve", "gateway"))
        );
        assert_eq!(split_token_id("zerospice@pve"), None);
        assert_eq!(split_token_id("zerospice!gateway"), None);
        assert_eq!(split_token_id("a b@pve!x1"), None);
    }

    #[test]
    fn rel_path_knows_only_api2_json() {
        assert_eq!(rel_path("/api2/json/version").unwrap(), "/version");
        assert_eq!(rel_path("/api2/json").unwrap(), "/");
        assert_eq!(rel_path("/api2/json/").unwrap(), "/");
        assert_eq!(rel_path("/").unwrap_err().status, 501);
        assert_eq!(rel_path("/api2/").unwrap_err().status, 501);
        assert_eq!(rel_path("/api2/extjs/version").unwrap_err().status, 501);
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("UPID%3Apve%21x"), "UPID:pve!x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn upid_pattern() {
        assert!(valid_upid(
            "UPID:pve:00001000:01001000:65000000:qmstart:100:zerospice@pve!gateway:"
        ));
        assert!(!valid_upid(
            "UPID:pve:1000:01001000:65000000:qmstart:100:u:"
        ));
        assert!(!valid_upid("UPID:pve"));
        assert!(!valid_upid(""));
    }

    #[test]
    fn addresses() {
        for ok in ["pve", "pve.example.com", "10.0.0.1", "::1", "fe80::1"] {
            assert!(valid_address(ok), "{ok}");
        }
        for bad in ["", "a b", "http://x", "-x", "x..y", "a/b"] {
            assert!(!valid_address(bad), "{bad}");
        }
    }
}
