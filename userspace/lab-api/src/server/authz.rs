//! Who a request's user is: the user a client certificate proved (what
//! each may do is [`super::rbac`]'s).
use crate::auth::User;

/// What a connection proved in its TLS handshake.
#[derive(Clone, Debug)]
pub(super) struct Peer {
    /// The user of a client certificate the CA signed.
    pub(super) cert_user: Option<User>,
}
