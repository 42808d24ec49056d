//! The one error type of the HTTP API: every failure a handler can meet, mapped to its
//! status code and JSON body in a single `match`.
//!
//! Bodies are `{"code": "...", "message": "..."}`: the Tensorlake SDK shows the raw body
//! (`API error (status N): <body>`) and reads `code` as the machine-readable reason.
//! Internal errors are logged with an incident id; the client sees only the id.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names something invalid; the message says what.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    /// Unknown, or belonging to another namespace (the two are not told apart).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The sandbox's disk quota (`resources.disk_mb`) would be crossed.
    #[error("{0}")]
    InsufficientStorage(String),
    /// A quota (the namespace's, or the sandbox's) would be crossed; the message names it.
    #[error("{0}")]
    QuotaExceeded(String),
    /// A service this node depends on (the shared object store) failed; the message says
    /// which and why, without credentials or host paths.
    #[error("{0}")]
    Unavailable(String),
    /// A failure of the server itself: logged in full, never shown.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The error answers every data-plane route can give, documented once for all of them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Never built: it only describes answers in the OpenAPI document.
pub enum DataPlaneErrors {
    #[response(status = 400, description = "No sandbox named by the header")]
    NoSandbox(ErrorBody),
    #[response(status = 401, description = "No valid API key")]
    Unauthorized(ErrorBody),
    #[response(status = 404, description = "Unknown sandbox (or another namespace's), or unknown process")]
    NotFound(ErrorBody),
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable reason: `invalid_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `payload_too_large`, `quota_exceeded`, `not_implemented`, `internal`, ...
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid_request", m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m.to_string()),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            ApiError::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m),
            ApiError::InsufficientStorage(m) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", m),
            ApiError::QuotaExceeded(m) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            ApiError::Internal(e) => {
                let incident = super::ids::incident();
                tracing::error!(incident, "internal error: {e:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("internal server error (incident {incident})"))
            }
        };
        let mut response = (status, axum::Json(ErrorBody { code, message })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl ApiError {
    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("metadata database"))
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("blocking task"))
    }
}

/// Errors from starting a program: the ones about the program the caller named are
/// theirs to fix (400); the rest are ours.
impl From<stasis_runtime::Error> for ApiError {
    fn from(e: stasis_runtime::Error) -> Self {
        use stasis_runtime::Error as E;
        match e {
            E::NotWasm { .. }
            | E::InvalidProgram { .. }
            | E::CompileRefused { .. }
            | E::Link { .. }
            | E::CommandNotFound { .. }
            | E::ProgramUnreadable { .. }
            | E::ProgramTooLarge { .. }
            | E::InvalidArgument(_) => ApiError::BadRequest(e.to_string()),
            E::TooManyProcesses { .. } => ApiError::QuotaExceeded(e.to_string()),
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}
