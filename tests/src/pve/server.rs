//! The HTTPS side of the API: TLS with the node certificate, HTTP/1.1 via hyper, request bodies,
//! recording, and the QMP follow-up. Decisions are made in `api.rs`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use hyper::header::{
    HeaderName, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPIRES,
    PRAGMA, SERVER, TRANSFER_ENCODING,
};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, Instrument as _};

use super::api::{self, ApiResponse, Followup, Params};
use super::certs::ClusterPki;
use super::state::Shared;
use super::{qmp, ApiCall, Fault, TokenCheck};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// pve-http-server's `$limit_max_post`.
const MAX_POST: usize = 64 * 1024;
/// Request head limit (hyper answers 431 beyond it); pve-http-server allows 8 KiB of headers.
const MAX_HEAD: usize = 16 * 1024;

pub fn tls_acceptor(pki: &ClusterPki) -> anyhow::Result<TlsAcceptor> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![pki.node_cert_der.clone()], pki.node_key_der())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub async fn run(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    super::accept_loop(listener, move |tcp, peer| {
        let shared = Arc::clone(&shared);
        let acceptor = acceptor.clone();
        let span = tracing::debug_span!("pve_api_conn", %peer);
        async move { serve_connection(shared, acceptor, tcp).await }.instrument(span)
    })
    .await;
}

async fn serve_connection(shared: Arc<Shared>, acceptor: TlsAcceptor, tcp: TcpStream) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(serve_request(&shared, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        debug!(error = %e, "connection ended with an error");
    }
}

struct RequestInfo {
    method: String,
    /// Percent-decoded path.
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    content_type: Option<String>,
    content_length: Option<u64>,
    chunked: bool,
}

async fn serve_request(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let at = SystemTime::now();
    let header = |name: HeaderName| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let info = RequestInfo {
        method: req.method().as_str().to_owned(),
        path: api::percent_decode(req.uri().path()),
        query: req.uri().query().map(str::to_owned),
        authorization: header(AUTHORIZATION),
        content_type: header(CONTENT_TYPE),
        content_length: header(CONTENT_LENGTH).and_then(|v| v.trim().parse().ok()),
        chunked: req.headers().contains_key(TRANSFER_ENCODING),
    };
    let mut params: Params = info
        .query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let token = api::check_token(shared, info.authorization.as_deref());
    let token_check = match &token {
        Ok(_) => TokenCheck::Valid,
        Err((check, _)) => *check,
    };

    let response = respond(shared, req, &info, token, &mut params).await;

    debug!(
        method = %info.method,
        path = %info.path,
        status = response.status,
        ?token_check,
        "api call"
    );
    shared.lock().calls.push(ApiCall {
        at,
        method: info.method.clone(),
        path: info.path.clone(),
        query: info.query.clone(),
        params,
        token: token_check,
        status: response.status,
    });
    if response.status == 401 && !shared.auth_failure_delay.is_zero() {
        tokio::time::sleep(shared.auth_failure_delay).await;
    }
    to_hyper(&response)
}

async fn respond(
    shared: &Shared,
    req: Request<Incoming>,
    info: &RequestInfo,
    token: Result<String, (TokenCheck, String)>,
    params: &mut Params,
) -> ApiResponse {
    if let Err(e) = api::check_method(&info.method) {
        return e;
    }
    if info.chunked {
        return ApiResponse::bare(501, "chunked transfer encoding not supported");
    }
    let rel = match api::rel_path(&info.path) {
        Ok(rel) => rel,
        Err(e) => return e,
    };
    let slow = shared
        .lock()
        .fault(&info.path, |f| matches!(f, Fault::Slow(_)))
        .and_then(|f| match f {
            Fault::Slow(d) => Some(*d),
            _ => None,
        });
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    if let Some(e) = api::injected_error(&shared.lock(), &info.path, info.authorization.as_deref())
    {
        return e;
    }
    let authid = match token {
        Ok(authid) => authid,
        Err((_, message)) => return ApiResponse::bare(401, message),
    };
    match read_body(req, info).await {
        Ok(body) => params.extend(body),
        Err(e) => return e,
    }
    let mut response = {
        let mut st = shared.lock();
        api::dispatch(
            shared,
            &mut st,
            &info.method,
            &rel,
            params,
            &authid,
            SystemTime::now(),
        )
    };
    if let Some(Followup::SetSpicePassword {
        vmid,
        socket,
        password,
    }) = response.followup.take()
    {
        let result = tokio::time::timeout(QMP_TIMEOUT, qmp::set_spice_password(&socket, &password))
            .await
            .unwrap_or_else(|_| Err(qmp::QmpError::new("connect", "timeout")));
        if let Err(e) = result {
            return ApiResponse::error(
                500,
                format!(
                    "VM {vmid} qmp command '{}' failed - {}\n",
                    e.command, e.message
                ),
            );
        }
    }
    response
}

async fn read_body(req: Request<Incoming>, info: &RequestInfo) -> Result<Params, ApiResponse> {
    let may_have_body = info.method == "POST" || info.method == "PUT";
    if let Some(len) = info.content_length.filter(|len| *len > 0) {
        if !may_have_body {
            return Err(ApiResponse::bare(
                501,
                format!("Unexpected content for method '{}'", info.method),
            ));
        }
        if len > MAX_POST as u64 {
            return Err(ApiResponse::bare(501, "for data too large"));
        }
    }
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_POST).collect(),
    )
    .await;
    let body = match collected {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiResponse::bare(501, "for data too large"));
        }
        Ok(Err(_)) | Err(_) => return Err(ApiResponse::bare(400, "unable to read request body")),
    };
    if body.is_empty() {
        return Ok(Params::new());
    }
    if !may_have_body {
        return Err(ApiResponse::bare(
            501,
            format!("Unexpected content for method '{}'", info.method),
        ));
    }
    let ctype = info.content_type.clone().unwrap_or_default();
    let mime = ctype
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "" | "application/x-www-form-urlencoded" => {
            Ok(form_urlencoded::parse(&body).into_owned().collect())
        }
        "application/json" => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(obj)) => Ok(obj
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, v)
                })
                .collect::<BTreeMap<_, _>>()),
            _ => Err(ApiResponse::error(400, "malformed JSON request body\n")),
        },
        _ => Err(ApiResponse::bare(
            506,
            format!("upload 'Content-Type '{ctype}' not implemented"),
        )),
    }
}

fn to_hyper(resp: &ApiResponse) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = resp
        .body
        .as_ref()
        .and_then(|b| serde_json::to_vec(b).ok())
        .unwrap_or_default();
    let date = super::http_date(SystemTime::now());
    let mut builder = Response::builder()
        .status(status)
        .header(SERVER, "pve-api-daemon/3.0")
        .header(CACHE_CONTROL, "max-age=0")
        .header(PRAGMA, "no-cache")
        .header(EXPIRES, date);
    if resp.body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json;charset=UTF-8");
    }
    if resp.status >= 400 {
        // pve-http-server drops keep-alive after every error.
        builder = builder.header(CONNECTION, "close");
    }
    let mut response = builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::default()));
    if response.status() != status {
        *response.status_mut() = status;
    }
    if let Some(reason) = resp.message.as_deref().and_then(|m| m.lines().next()) {
        if let Ok(reason) = ReasonPhrase::try_from(reason.as_bytes()) {
            response.extensions_mut().insert(reason);
        }
    }
    response
}
