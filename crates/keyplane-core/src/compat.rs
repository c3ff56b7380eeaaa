//! Which agents a keyplaned serves: the agent protocol version in Hello against the
//! versions this server speaks. The policy is written out in `docs/ARCHITECTURE.md`
//! ("Agent and server versions").

/// The agent protocol this build speaks. 1: Hello without `protocol_version` (agents
/// released before it existed); 2: Hello carries `protocol_version`, `agent_time` and
/// `tzdb_version`.
pub const PROTOCOL_VERSION: i32 = 2;

/// The oldest protocol a server serves by default: the current one and the one before
/// (N-1). An operator may raise it (`--min-agent-protocol`), never lower it.
pub const MIN_PROTOCOL_VERSION: i32 = PROTOCOL_VERSION - 1;

/// What a server does with an agent's Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// The agent speaks this server's protocol.
    Current,
    /// An older protocol this server still serves; what it lacks is read as unset
    /// (e.g. no clock reported).
    Older(i32),
    /// A newer agent: served with what this server knows (fields it does not know
    /// are ignored, as protobuf does); the agent must not rely on anything newer.
    Newer(i32),
    /// Older than `min`: refused (FAILED_PRECONDITION), naming the minimum.
    TooOld {
        /// The protocol the agent speaks.
        agent: i32,
        /// The oldest this server serves.
        min: i32,
    },
}

/// The protocol a Hello speaks: `protocol_version` as sent, with 0 (the field unset)
/// read as 1, the protocol of agents released before the field existed.
pub fn hello_protocol(sent: i32) -> i32 {
    if sent == 0 { 1 } else { sent }
}

/// Decides on a Hello whose `protocol_version` field is `sent`, for a server that
/// serves `min..=PROTOCOL_VERSION` (a `min` above the current protocol is read as
/// the current one: a server never refuses its own agents).
pub fn check(sent: i32, min: i32) -> Compat {
    let agent = hello_protocol(sent);
    let min = min.min(PROTOCOL_VERSION);
    if agent < min {
        Compat::TooOld { agent, min }
    } else if agent == PROTOCOL_VERSION {
        Compat::Current
    } else if agent < PROTOCOL_VERSION {
        Compat::Older(agent)
    } else {
        Compat::Newer(agent)
    }
}

/// The refusal of a too-old agent, actionable: which protocol it speaks, the
/// minimum, and what to do.
pub fn too_old_message(agent: i32, min: i32) -> String {
    format!(
        "this agent speaks agent protocol {agent}; this keyplaned serves protocols {min} to {PROTOCOL_VERSION}: \
         upgrade keyplane-agent to a release speaking protocol {min} or newer (the release notes say which), then restart it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_table() {
        let n = PROTOCOL_VERSION;
        // sent protocol_version, server minimum, decision
        let table = [
            (n, MIN_PROTOCOL_VERSION, Compat::Current),
            (0, MIN_PROTOCOL_VERSION, Compat::Older(1)),
            (1, MIN_PROTOCOL_VERSION, Compat::Older(1)),
            (n + 1, MIN_PROTOCOL_VERSION, Compat::Newer(n + 1)),
            (0, n, Compat::TooOld { agent: 1, min: n }),
            (1, n, Compat::TooOld { agent: 1, min: n }),
            (
                -3,
                MIN_PROTOCOL_VERSION,
                Compat::TooOld { agent: -3, min: 1 },
            ),
            (n, n, Compat::Current),
            // A minimum beyond the current protocol is clamped: current agents stay served.
            (n, n + 5, Compat::Current),
            (n + 1, n + 5, Compat::Newer(n + 1)),
        ];
        for (sent, min, want) in table {
            assert_eq!(check(sent, min), want, "sent {sent}, min {min}");
        }
    }

    #[test]
    fn n_minus_one_is_served_by_default() {
        assert_eq!(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION - 1);
        assert!(!matches!(
            check(PROTOCOL_VERSION - 1, MIN_PROTOCOL_VERSION),
            Compat::TooOld { .. }
        ));
    }

    #[test]
    fn the_refusal_names_the_minimum_and_the_fix() {
        let m = too_old_message(1, 2);
        assert!(m.contains("protocol 1"), "{m}");
        assert!(m.contains("serves protocols 2 to"), "{m}");
        assert!(m.contains("upgrade keyplane-agent"), "{m}");
    }
}
