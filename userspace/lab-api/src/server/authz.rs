//! Who a request's user is and what they may do: the user a client
//! certificate proved, and the lab's stand-in for RBAC.
use tpbpf_lab::identity;

use super::ApiConfig;
use crate::auth::User;

/// What a connection proved in its TLS handshake.
#[derive(Clone, Debug)]
pub(super) struct Peer {
    /// The user of a client certificate the CA signed.
    pub(super) cert_user: Option<User>,
}

/// What a request's user may do (the lab's stand-in for RBAC).
pub(super) enum Who {
    /// Group `system:masters`: cluster-admin.
    Admin(String),
    /// `lab-developer`: reads everything, port-forwards in these
    /// namespaces, writes nothing.
    Restricted(String, Vec<String>),
    /// Anyone else (and `system:anonymous`): discovery at most.
    Unbound(User),
}

impl Who {
    pub(super) fn of(user: User, cfg: &ApiConfig) -> Self {
        if user.in_group(identity::ADMIN_GROUP) {
            Who::Admin(user.name)
        } else if user.name == identity::DEVELOPER_USER {
            Who::Restricted(user.name, cfg.restricted_namespaces.clone())
        } else {
            Who::Unbound(user)
        }
    }

    pub(super) fn name(&self) -> &str {
        match self {
            Who::Admin(name) | Who::Restricted(name, _) => name,
            Who::Unbound(u) => &u.name,
        }
    }
}
