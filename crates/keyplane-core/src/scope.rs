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

    /// Whether a token of this scope may call `method` (the bare RPC name).
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
        for scope in [Admin, Ops, ReadOnly] {
            assert_eq!(TokenScope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(TokenScope::parse("root"), None);
    }
}
