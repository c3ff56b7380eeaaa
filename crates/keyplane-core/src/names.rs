//! Resource names (`sites/{site}/devices/{device}` …), parsed once at the edge.

use chrono::NaiveDate;
use std::fmt;
use uuid::Uuid;

/// Why a resource name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource name {name:?}: expected {expected}")]
pub struct NameError {
    /// The name as given (names never hold secrets).
    pub name: String,
    /// The pattern that was expected.
    pub expected: &'static str,
}

fn segments<'a>(name: &'a str, pattern: &[&str]) -> Option<Vec<&'a str>> {
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() != pattern.len() * 2 {
        return None;
    }
    let mut ids = Vec::new();
    for (i, literal) in pattern.iter().enumerate() {
        if parts[2 * i] != *literal || parts[2 * i + 1].is_empty() {
            return None;
        }
        ids.push(parts[2 * i + 1]);
    }
    Some(ids)
}

fn parse_uuids<const N: usize>(
    name: &str,
    pattern: &[&str; N],
    expected: &'static str,
) -> Result<[Uuid; N], NameError> {
    let err = || NameError {
        name: name.to_owned(),
        expected,
    };
    let ids = segments(name, pattern).ok_or_else(err)?;
    let mut out = [Uuid::nil(); N];
    for (slot, id) in out.iter_mut().zip(ids) {
        *slot = Uuid::try_parse(id).map_err(|_| err())?;
    }
    Ok(out)
}

/// `sites/{site}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteName {
    /// The site id.
    pub site: Uuid,
}

impl SiteName {
    /// Parses `sites/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let [site] = parse_uuids(name, &["sites"], "sites/{site}")?;
        Ok(SiteName { site })
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}", self.site)
    }
}

/// `sites/{site}/devices/{device}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName {
    /// The site id.
    pub site: Uuid,
    /// The device id.
    pub device: Uuid,
}

impl DeviceName {
    /// Parses `sites/{uuid}/devices/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let [site, device] =
            parse_uuids(name, &["sites", "devices"], "sites/{site}/devices/{device}")?;
        Ok(DeviceName { site, device })
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/devices/{}", self.site, self.device)
    }
}

/// `sites/{site}/users/{user}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName {
    /// The site id.
    pub site: Uuid,
    /// The user id.
    pub user: Uuid,
}

impl UserName {
    /// Parses `sites/{uuid}/users/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let [site, user] = parse_uuids(name, &["sites", "users"], "sites/{site}/users/{user}")?;
        Ok(UserName { site, user })
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/users/{}", self.site, self.user)
    }
}

/// `sites/{site}/users/{user}/credentials/{credential}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialName {
    /// The site id.
    pub site: Uuid,
    /// The user id.
    pub user: Uuid,
    /// The credential id.
    pub credential: Uuid,
}

impl CredentialName {
    /// Parses `sites/{uuid}/users/{uuid}/credentials/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let [site, user, credential] = parse_uuids(
            name,
            &["sites", "users", "credentials"],
            "sites/{site}/users/{user}/credentials/{credential}",
        )?;
        Ok(CredentialName {
            site,
            user,
            credential,
        })
    }
}

impl fmt::Display for CredentialName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sites/{}/users/{}/credentials/{}",
            self.site, self.user, self.credential
        )
    }
}

/// `sites/{site}/partitions/{number}` with number 1..=8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionName {
    /// The site id.
    pub site: Uuid,
    /// The partition number, 1..=8.
    pub number: u8,
}

/// Highest partition number a site may have.
pub const MAX_PARTITIONS: u8 = 8;

impl PartitionName {
    /// Parses `sites/{uuid}/partitions/{1..8}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        const EXPECTED: &str = "sites/{site}/partitions/{1..8}";
        let err = || NameError {
            name: name.to_owned(),
            expected: EXPECTED,
        };
        let ids = segments(name, &["sites", "partitions"]).ok_or_else(err)?;
        let site = Uuid::try_parse(ids[0]).map_err(|_| err())?;
        let number: u8 = ids[1].parse().map_err(|_| err())?;
        if !(1..=MAX_PARTITIONS).contains(&number) {
            return Err(err());
        }
        Ok(PartitionName { site, number })
    }
}

impl fmt::Display for PartitionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/partitions/{}", self.site, self.number)
    }
}

/// `sites/{site}/users/{user}/personalAccessPlan`: the one plan every user has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PersonalPlanName {
    /// The site id.
    pub site: Uuid,
    /// The user id.
    pub user: Uuid,
}

/// The last segment of a personal access plan's name.
const PERSONAL_PLAN: &str = "/personalAccessPlan";

impl PersonalPlanName {
    /// Parses `sites/{uuid}/users/{uuid}/personalAccessPlan`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        const EXPECTED: &str = "sites/{site}/users/{user}/personalAccessPlan";
        let user = name
            .strip_suffix(PERSONAL_PLAN)
            .and_then(|user| UserName::parse(user).ok())
            .ok_or_else(|| NameError {
                name: name.to_owned(),
                expected: EXPECTED,
            })?;
        Ok(PersonalPlanName {
            site: user.site,
            user: user.user,
        })
    }

    /// Whether `name` ends like a personal plan's name, well-formed or not.
    pub fn looks_like(name: &str) -> bool {
        name.ends_with(PERSONAL_PLAN)
    }
}

impl fmt::Display for PersonalPlanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/users/{}{PERSONAL_PLAN}", self.site, self.user)
    }
}

/// `sites/{site}/accessPlans/{plan}`: a standard access plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessPlanName {
    /// The site id.
    pub site: Uuid,
    /// The plan id.
    pub plan: Uuid,
}

impl AccessPlanName {
    /// Parses `sites/{uuid}/accessPlans/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let [site, plan] = parse_uuids(
            name,
            &["sites", "accessPlans"],
            "sites/{site}/accessPlans/{plan}",
        )?;
        Ok(AccessPlanName { site, plan })
    }
}

impl fmt::Display for AccessPlanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/accessPlans/{}", self.site, self.plan)
    }
}

/// `sites/{site}/holidays/{YYYY-MM-DD}`: a site holiday, named by its local date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HolidayName {
    /// The site id.
    pub site: Uuid,
    /// The local date.
    pub day: NaiveDate,
}

impl HolidayName {
    /// Parses `sites/{uuid}/holidays/{YYYY-MM-DD}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let err = || NameError {
            name: name.to_owned(),
            expected: "sites/{site}/holidays/{YYYY-MM-DD}",
        };
        let ids = segments(name, &["sites", "holidays"]).ok_or_else(err)?;
        let site = Uuid::try_parse(ids[0]).map_err(|_| err())?;
        let day = NaiveDate::parse_from_str(ids[1], "%Y-%m-%d").map_err(|_| err())?;
        Ok(HolidayName { site, day })
    }
}

impl fmt::Display for HolidayName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/holidays/{}", self.site, self.day)
    }
}

/// `sites/{site}/devices/{device}/localCodes/{slot}`: a code set at the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalCodeName {
    /// The device holding it.
    pub device: DeviceName,
    /// The slot (user number) it is in.
    pub slot: u16,
}

impl LocalCodeName {
    /// Parses `sites/{uuid}/devices/{uuid}/localCodes/{slot}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let err = || NameError {
            name: name.to_owned(),
            expected: "sites/{site}/devices/{device}/localCodes/{slot}",
        };
        let ids = segments(name, &["sites", "devices", "localCodes"]).ok_or_else(err)?;
        let site = Uuid::try_parse(ids[0]).map_err(|_| err())?;
        let device = Uuid::try_parse(ids[1]).map_err(|_| err())?;
        let slot = ids[2].parse::<u16>().map_err(|_| err())?;
        Ok(LocalCodeName {
            device: DeviceName { site, device },
            slot,
        })
    }
}

impl fmt::Display for LocalCodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/localCodes/{}", self.device, self.slot)
    }
}

/// `sites/{site}/syncStatus`: how far a site's devices are from what keyplane wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyncStatusName {
    /// The site id.
    pub site: Uuid,
}

impl SyncStatusName {
    /// Parses `sites/{uuid}/syncStatus`; the site's own name `sites/{uuid}` is
    /// accepted too, as GetSyncStatus always has.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let site = name.strip_suffix("/syncStatus").unwrap_or(name);
        let site = SiteName::parse(site).map_err(|_| NameError {
            name: name.to_owned(),
            expected: "sites/{site}/syncStatus",
        })?;
        Ok(SyncStatusName { site: site.site })
    }
}

impl fmt::Display for SyncStatusName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/syncStatus", self.site)
    }
}

/// `dealerTokens/{token}`: one of a dealer's API tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DealerTokenName {
    /// The token's id (not the secret).
    pub token: Uuid,
}

impl DealerTokenName {
    /// Parses `dealerTokens/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let [token] = parse_uuids(name, &["dealerTokens"], "dealerTokens/{token}")?;
        Ok(DealerTokenName { token })
    }
}

impl fmt::Display for DealerTokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dealerTokens/{}", self.token)
    }
}

/// A singleton of a site, `sites/{site}/{collection}` (OpsService resources).
fn site_singleton(name: &str, singleton: &str, expected: &'static str) -> Result<Uuid, NameError> {
    let err = || NameError {
        name: name.to_owned(),
        expected,
    };
    let site = name
        .strip_suffix(singleton)
        .and_then(|n| n.strip_suffix('/'))
        .ok_or_else(err)?;
    SiteName::parse(site).map(|s| s.site).map_err(|_| err())
}

/// `sites/{site}/agentConnection`: the open Sync stream of a site's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentConnectionName {
    /// The site id.
    pub site: Uuid,
}

impl AgentConnectionName {
    /// Parses `sites/{uuid}/agentConnection`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        site_singleton(name, "agentConnection", "sites/{site}/agentConnection")
            .map(|site| AgentConnectionName { site })
    }
}

impl fmt::Display for AgentConnectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/agentConnection", self.site)
    }
}

/// `sites/{site}/opsStatus`: a site's change log against its devices, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpsStatusName {
    /// The site id.
    pub site: Uuid,
}

impl OpsStatusName {
    /// Parses `sites/{uuid}/opsStatus`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        site_singleton(name, "opsStatus", "sites/{site}/opsStatus")
            .map(|site| OpsStatusName { site })
    }
}

impl fmt::Display for OpsStatusName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/opsStatus", self.site)
    }
}

/// `sites/{site}/events/{position}`: an event, named by its position in its site's
/// event log (output only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventName {
    /// The site id.
    pub site: Uuid,
    /// The event's position in the site's log (`Event.site_sequence`).
    pub position: i64,
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sites/{}/events/{}", self.site, self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "0b0e6c3e-8c1e-4a57-9a43-5f3f2a0c1d10";
    const D: &str = "7f1d2c3b-4a59-4e6f-8071-92a3b4c5d6e7";

    #[test]
    fn names_round_trip() {
        let site = format!("sites/{S}");
        assert_eq!(SiteName::parse(&site).map(|n| n.to_string()), Ok(site));
        let dev = format!("sites/{S}/devices/{D}");
        assert_eq!(DeviceName::parse(&dev).map(|n| n.to_string()), Ok(dev));
        let user = format!("sites/{S}/users/{D}");
        assert_eq!(UserName::parse(&user).map(|n| n.to_string()), Ok(user));
        let cred = format!("sites/{S}/users/{D}/credentials/{S}");
        assert_eq!(
            CredentialName::parse(&cred).map(|n| n.to_string()),
            Ok(cred)
        );
        let part = format!("sites/{S}/partitions/3");
        assert_eq!(PartitionName::parse(&part).map(|n| n.to_string()), Ok(part));
    }

    #[test]
    fn malformed_names_are_refused() {
        let bad_sites = [
            String::new(),
            "sites/".into(),
            "sites/abc".into(),
            format!("site/{S}"),
            format!("sites/{S}/"),
            format!("sites/{S}/devices/{D}"),
        ];
        for name in &bad_sites {
            assert!(SiteName::parse(name).is_err(), "{name:?}");
        }
        let bad_devices = [
            format!("sites/{S}/users/{D}"),
            format!("sites/{S}/devices/"),
            format!("sites/{S}/devices/{D}/x"),
        ];
        for name in &bad_devices {
            assert!(DeviceName::parse(name).is_err(), "{name:?}");
        }
        for n in ["0", "9", "x", "-1", ""] {
            let name = format!("sites/{S}/partitions/{n}");
            assert!(PartitionName::parse(&name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn resource_names_table() {
        let plan = format!("sites/{S}/users/{D}/personalAccessPlan");
        let access = format!("sites/{S}/accessPlans/{D}");
        let holiday = format!("sites/{S}/holidays/2026-12-25");
        let local = format!("sites/{S}/devices/{D}/localCodes/7");
        let sync = format!("sites/{S}/syncStatus");
        // (name, parses, round trips to itself)
        let table: Vec<(&str, String, bool)> = vec![
            ("personal plan", plan.clone(), true),
            (
                "personal plan of a credential",
                format!("sites/{S}/users/{D}/credentials/{S}/personalAccessPlan"),
                false,
            ),
            (
                "personal plan without user",
                format!("sites/{S}/personalAccessPlan"),
                false,
            ),
            ("access plan", access.clone(), true),
            (
                "access plan not a uuid",
                format!("sites/{S}/accessPlans/x"),
                false,
            ),
            ("holiday", holiday.clone(), true),
            (
                "holiday not a date",
                format!("sites/{S}/holidays/2026-13-01"),
                false,
            ),
            (
                "holiday other format",
                format!("sites/{S}/holidays/25-12-2026"),
                false,
            ),
            ("local code", local.clone(), true),
            (
                "local code slot too big",
                format!("sites/{S}/devices/{D}/localCodes/70000"),
                false,
            ),
            (
                "local code negative",
                format!("sites/{S}/devices/{D}/localCodes/-1"),
                false,
            ),
            ("sync status", sync.clone(), true),
            (
                "agent connection",
                format!("sites/{S}/agentConnection"),
                true,
            ),
            ("agent connection bare site", format!("sites/{S}"), false),
            (
                "agent connection other",
                format!("sites/{S}/agentConnections"),
                false,
            ),
            (
                "agent connection no site",
                "sites//agentConnection".to_owned(),
                false,
            ),
            ("ops status", format!("sites/{S}/opsStatus"), true),
            (
                "ops status not a uuid",
                "sites/x/opsStatus".to_owned(),
                false,
            ),
            (
                "ops status trailing",
                format!("sites/{S}/opsStatus/x"),
                false,
            ),
            ("dealer token", format!("dealerTokens/{D}"), true),
            (
                "dealer token not a uuid",
                "dealerTokens/x".to_owned(),
                false,
            ),
            (
                "dealer token under a site",
                format!("sites/{S}/dealerTokens/{D}"),
                false,
            ),
            ("dealer token bare", "dealerTokens/".to_owned(), false),
        ];
        for (what, name, ok) in &table {
            let got = match *what {
                w if w.starts_with("personal") => {
                    PersonalPlanName::parse(name).map(|n| n.to_string())
                }
                w if w.starts_with("access") => AccessPlanName::parse(name).map(|n| n.to_string()),
                w if w.starts_with("holiday") => HolidayName::parse(name).map(|n| n.to_string()),
                w if w.starts_with("local") => LocalCodeName::parse(name).map(|n| n.to_string()),
                w if w.starts_with("agent") => {
                    AgentConnectionName::parse(name).map(|n| n.to_string())
                }
                w if w.starts_with("ops") => OpsStatusName::parse(name).map(|n| n.to_string()),
                w if w.starts_with("dealer") => DealerTokenName::parse(name).map(|n| n.to_string()),
                _ => SyncStatusName::parse(name).map(|n| n.to_string()),
            };
            assert_eq!(got.is_ok(), *ok, "{what}: {got:?}");
            if *ok {
                assert_eq!(got.as_ref(), Ok(name), "{what}");
            } else {
                let err = got.expect_err(what);
                assert_eq!(&err.name, name, "{what}: the error names what was given");
            }
        }
        // GetSyncStatus takes the site's own name too.
        assert_eq!(
            SyncStatusName::parse(&format!("sites/{S}")).map(|n| n.to_string()),
            Ok(sync)
        );
        assert!(PersonalPlanName::looks_like(&plan));
        assert!(!PersonalPlanName::looks_like(&access));
        let l = LocalCodeName::parse(&local).expect("local code");
        assert_eq!(
            (l.device.to_string(), l.slot),
            (format!("sites/{S}/devices/{D}"), 7)
        );
    }
}
