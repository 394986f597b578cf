//! Trussed dispatcher with the backends that `piv-authenticator` 0.7 needs.
//!
//! The applet's client must implement `AuthClient` (trussed-auth: PIN/PUK storage and retry
//! counters), `ChunkedClient`, `WrapKeyToFileClient` and `HpkeClient` (trussed-staging) beside the
//! core crypto and filesystem clients. `trussed_staging::virt` alone lacks the auth backend, so this
//! module puts both backends behind one `ExtensionDispatch`. Requests are offered to the backends
//! in the order of [`BACKENDS`]; a backend that does not handle a core request answers
//! `RequestNotAvailable` and the next one is tried, ending with trussed's core backend.

use trussed::{
    backend::{Backend as _, BackendId},
    platform::Platform,
    serde_extensions::{ExtensionDispatch, ExtensionId, ExtensionImpl},
    service::ServiceResources,
    types::Context,
};
use trussed_auth::AuthExtension;
use trussed_auth_backend::{AuthBackend, AuthContext, FilesystemLayout};
use trussed_chunked::ChunkedExtension;
use trussed_core::{
    api::{reply, request, Reply, Request},
    types::Location,
    Error,
};
use trussed_hpke::HpkeExtension;
use trussed_staging::{StagingBackend, StagingContext};
use trussed_wrap_key_to_file::WrapKeyToFileExtension;

/// Backend order for the PIV client.
pub const BACKENDS: &[BackendId<Backend>] = &[
    BackendId::Custom(Backend::Staging),
    BackendId::Custom(Backend::Auth),
    BackendId::Core,
];

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Auth,
    Staging,
}

#[derive(Debug, Clone, Copy)]
pub enum Extension {
    Auth,
    Chunked,
    WrapKeyToFile,
    Hpke,
}

impl From<Extension> for u8 {
    fn from(extension: Extension) -> u8 {
        match extension {
            Extension::Auth => 0,
            Extension::Chunked => 1,
            Extension::WrapKeyToFile => 2,
            Extension::Hpke => 3,
        }
    }
}

impl TryFrom<u8> for Extension {
    type Error = Error;

    fn try_from(id: u8) -> Result<Self, Error> {
        match id {
            0 => Ok(Self::Auth),
            1 => Ok(Self::Chunked),
            2 => Ok(Self::WrapKeyToFile),
            3 => Ok(Self::Hpke),
            _ => Err(Error::FunctionNotSupported),
        }
    }
}

pub struct Dispatch {
    auth: AuthBackend,
    staging: StagingBackend,
}

impl Default for Dispatch {
    fn default() -> Self {
        Self {
            // PINs live in the internal store, like on a Nitrokey 3.
            auth: AuthBackend::new(Location::Internal, FilesystemLayout::V0),
            staging: StagingBackend::new(),
        }
    }
}

#[derive(Default)]
pub struct DispatchContext {
    auth: AuthContext,
    staging: StagingContext,
}

impl ExtensionDispatch for Dispatch {
    type BackendId = Backend;
    type Context = DispatchContext;
    type ExtensionId = Extension;

    fn core_request<P: Platform>(
        &mut self,
        backend: &Backend,
        ctx: &mut Context<DispatchContext>,
        request: &Request,
        resources: &mut ServiceResources<P>,
    ) -> Result<Reply, Error> {
        match backend {
            Backend::Auth => {
                self.auth
                    .request(&mut ctx.core, &mut ctx.backends.auth, request, resources)
            }
            Backend::Staging => {
                self.staging
                    .request(&mut ctx.core, &mut ctx.backends.staging, request, resources)
            }
        }
    }

    fn extension_request<P: Platform>(
        &mut self,
        backend: &Backend,
        extension: &Extension,
        ctx: &mut Context<DispatchContext>,
        request: &request::SerdeExtension,
        resources: &mut ServiceResources<P>,
    ) -> Result<reply::SerdeExtension, Error> {
        match (backend, extension) {
            (Backend::Auth, Extension::Auth) => self.auth.extension_request_serialized(
                &mut ctx.core,
                &mut ctx.backends.auth,
                request,
                resources,
            ),
            (Backend::Staging, Extension::Chunked) => {
                <StagingBackend as ExtensionImpl<ChunkedExtension>>::extension_request_serialized(
                    &mut self.staging,
                    &mut ctx.core,
                    &mut ctx.backends.staging,
                    request,
                    resources,
                )
            }
            (Backend::Staging, Extension::WrapKeyToFile) => <StagingBackend as ExtensionImpl<
                WrapKeyToFileExtension,
            >>::extension_request_serialized(
                &mut self.staging,
                &mut ctx.core,
                &mut ctx.backends.staging,
                request,
                resources,
            ),
            (Backend::Staging, Extension::Hpke) => {
                <StagingBackend as ExtensionImpl<HpkeExtension>>::extension_request_serialized(
                    &mut self.staging,
                    &mut ctx.core,
                    &mut ctx.backends.staging,
                    request,
                    resources,
                )
            }
            _ => Err(Error::RequestNotAvailable),
        }
    }
}

impl ExtensionId<AuthExtension> for Dispatch {
    type Id = Extension;
    const ID: Extension = Extension::Auth;
}

impl ExtensionId<ChunkedExtension> for Dispatch {
    type Id = Extension;
    const ID: Extension = Extension::Chunked;
}

impl ExtensionId<WrapKeyToFileExtension> for Dispatch {
    type Id = Extension;
    const ID: Extension = Extension::WrapKeyToFile;
}

impl ExtensionId<HpkeExtension> for Dispatch {
    type Id = Extension;
    const ID: Extension = Extension::Hpke;
}

/// The trussed client type the applet runs on.
pub type VirtClient<'a> = trussed::virt::Client<'a, Dispatch>;
