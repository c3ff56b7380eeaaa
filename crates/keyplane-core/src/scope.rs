//! What a dealer token's scope lets it call. A rule of the API, decided by method
//! name before any handler runs; a method not named here is admin-only, so a new
//! RPC is closed to narrower tokens until it is classified.

/// The scope of a dealer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenScope {
    /// Every call, including managing dealer tokens.
    Admin,
    /// Reads, plus the site operations of a monitoring desk: lockdown and its
    /// release, agent tokens, enrollment codes, revoking agents. No codes, users,
    /// devices or plans.
    Ops,
    /// Reads only: Get*, List*, Watch*.
    ReadOnly,
}

/// Methods an ops token may call besides reads.
const OPS_WRITES: &[&str] = &[
    "LockdownDoors",
    "ReleaseLockdown",
    "IssueAgentToken",
    "CreateEnrollmentCode",
    "RevokeAgents",
];

/// Reads that stay admin-only (they concern the dealer's own credentials).
const ADMIN_READS: &[&str] = &["ListDealerTokens"];

/// The service dealers call for the back office.
pub const ADMIN_SERVICE: &str = "keyplane.v1.AdminService";
/// The operators' service: open to ops and admin tokens, reads included. Read-only
/// tokens are refused all of it: agents' peers and keyplaned's replicas are
/// infrastructure, not the site facts a read-only desk watches (GetSyncStatus shows
/// those), and its remedies act on live streams.
pub const OPS_SERVICE: &str = "keyplane.v1.OpsService";

impl TokenScope {
    /// The scope's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Admin => "admin",
            TokenScope::Ops => "ops",
            TokenScope::ReadOnly => "read_only",
        }
    }

    /// The scope named `s`.
    pub fn parse(s: &str) -> Option<TokenScope> {
        match s {
            "admin" => Some(TokenScope::Admin),
            "ops" => Some(TokenScope::Ops),
            "read_only" => Some(TokenScope::ReadOnly),
            _ => None,
        }
    }

    /// Whether a token of this scope may call the gRPC `path`
    /// (`/keyplane.v1.AdminService/GetSite`). A path of no dealer service is admin-only,
    /// like an unclassified method.
    pub fn allows_path(self, path: &str) -> bool {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", path));
        match service {
            ADMIN_SERVICE => self.allows(method),
            OPS_SERVICE => matches!(self, TokenScope::Admin | TokenScope::Ops),
            _ => self == TokenScope::Admin,
        }
    }

    /// Whether a token of this scope may call AdminService's `method` (the bare RPC
    /// name).
    pub fn allows(self, method: &str) -> bool {
        let read = ["Get", "List", "Watch"]
            .iter()
            .any(|p| method.starts_with(p))
            && !ADMIN_READS.contains(&method);
        match self {
            TokenScope::Admin => true,
            TokenScope::Ops => read || OPS_WRITES.contains(&method),
            TokenScope::ReadOnly => read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_scope_may_call() {
        use TokenScope::*;
        // (method, admin, ops, read_only)
        let table: &[(&str, bool, bool, bool)] = &[
            ("GetSite", true, true, true),
            ("ListCredentials", true, true, true),
            ("WatchEvents", true, true, true),
            ("GetSyncStatus", true, true, true),
            ("CreateCredential", true, false, false),
            ("UpdateUser", true, false, false),
            ("DeleteSite", true, false, false),
            ("LockdownDoors", true, true, false),
            ("ReleaseLockdown", true, true, false),
            ("RevokeAgents", true, true, false),
            ("CreateEnrollmentCode", true, true, false),
            ("IssueAgentToken", true, true, false),
            ("CreateDealerToken", true, false, false),
            ("RevokeDealerToken", true, false, false),
            ("ListDealerTokens", true, false, false),
            ("SomeFutureMethod", true, false, false),
        ];
        for (method, admin, ops, read_only) in table {
            assert_eq!(Admin.allows(method), *admin, "admin {method}");
            assert_eq!(Ops.allows(method), *ops, "ops {method}");
            assert_eq!(ReadOnly.allows(method), *read_only, "read_only {method}");
        }
        for (method, admin, ops, read_only) in table {
            let path = format!("/keyplane.v1.AdminService/{method}");
            assert_eq!(Admin.allows_path(&path), *admin, "admin {path}");
            assert_eq!(Ops.allows_path(&path), *ops, "ops {path}");
            assert_eq!(ReadOnly.allows_path(&path), *read_only, "read_only {path}");
        }
        for scope in [Admin, Ops, ReadOnly] {
            assert_eq!(TokenScope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(TokenScope::parse("root"), None);
    }

    #[test]
    fn the_ops_service_is_for_ops_and_admin_tokens_only() {
        use TokenScope::*;
        // (path, admin, ops, read_only)
        let table: &[(&str, bool, bool, bool)] = &[
            (
                "/keyplane.v1.OpsService/ListAgentConnections",
                true,
                true,
                false,
            ),
            (
                "/keyplane.v1.OpsService/GetSiteOpsStatus",
                true,
                true,
                false,
            ),
            ("/keyplane.v1.OpsService/ResyncSite", true, true, false),
            (
                "/keyplane.v1.OpsService/CloseAgentConnection",
                true,
                true,
                false,
            ),
            (
                "/keyplane.v1.OpsService/SomeFutureMethod",
                true,
                true,
                false,
            ),
            // Not a dealer service, or not a path: admin-only.
            ("/keyplane.v1.AgentService/Sync", true, false, false),
            ("/other.Service/GetThing", true, false, false),
            ("GetSite", true, false, false),
            ("", true, false, false),
        ];
        for (path, admin, ops, read_only) in table {
            assert_eq!(Admin.allows_path(path), *admin, "admin {path}");
            assert_eq!(Ops.allows_path(path), *ops, "ops {path}");
            assert_eq!(ReadOnly.allows_path(path), *read_only, "read_only {path}");
        }
    }
}
