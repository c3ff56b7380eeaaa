//! Authority levels of VISTA-style panels (seed 002): who may add users, and whose
//! codes one may change or delete. Every rule is a pure function of the actor's and
//! the target's levels per partition.

use std::collections::BTreeMap;
use std::fmt;

/// A user's authority in one partition. Lower numbers are higher authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Level 0: the installer (user 001), one per panel.
    Installer = 0,
    /// Level 1: master.
    Master = 1,
    /// Level 2: manager.
    Manager = 2,
    /// Level 3: operator A (arm, disarm, bypass).
    OperatorA = 3,
    /// Level 4: operator B (arm, disarm, no bypass).
    OperatorB = 4,
    /// Level 5: operator C, the babysitter: disarms only what the same code armed.
    OperatorC = 5,
    /// Level 6: duress: disarms like any code and raises a silent alarm.
    Duress = 6,
}

impl Level {
    /// The level for its number, 0..=6.
    pub fn from_number(n: i32) -> Option<Level> {
        Some(match n {
            0 => Level::Installer,
            1 => Level::Master,
            2 => Level::Manager,
            3 => Level::OperatorA,
            4 => Level::OperatorB,
            5 => Level::OperatorC,
            6 => Level::Duress,
            _ => return None,
        })
    }

    /// The level's number.
    pub fn number(self) -> i32 {
        self as i32
    }

    /// Whether this level may add users and change other codes (0, 1 and 2).
    pub fn manages_users(self) -> bool {
        self <= Level::Manager
    }

    /// Whether this level may change its own code (masters and managers; the
    /// installer changes its own in program mode, which keyplane also allows).
    pub fn may_change_own_code(self) -> bool {
        self <= Level::Manager
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Level::Installer => "installer",
            Level::Master => "master",
            Level::Manager => "manager",
            Level::OperatorA => "operator A",
            Level::OperatorB => "operator B",
            Level::OperatorC => "operator C",
            Level::Duress => "duress",
        };
        write!(f, "{name} (level {})", self.number())
    }
}

/// A user's levels, per partition number.
pub type Authorities = BTreeMap<u8, Level>;

/// Who acts on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The dealer: acts at installer level in every partition of its own sites.
    Dealer,
    /// A site user acting through the back office, with their own levels.
    User {
        /// Resource name of the user (for messages).
        name: String,
        /// Their levels.
        authorities: Authorities,
    },
}

/// The metadata header naming the partition a user acts from.
pub const ACTING_PARTITION_HEADER: &str = "keyplane-acting-partition";

/// What an actor attempts, so refusals name it rather than some other act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Granting levels to a new or existing user.
    Grant,
    /// Adding, changing or deleting a code.
    ChangeCode,
    /// Deleting a user (and with them every code they hold).
    DeleteUser,
    /// Changing a user's levels.
    ChangeLevels,
}

impl Action {
    fn partitions_rule(self) -> &'static str {
        match self {
            Action::Grant => "users can only grant partitions they hold",
            Action::ChangeCode => "users add, change or delete codes only in partitions they hold",
            Action::DeleteUser => "users delete only users whose every partition they hold",
            Action::ChangeLevels => "users change levels only in partitions they hold",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Grant | Action::ChangeCode => "change or delete the code of",
            Action::DeleteUser => "delete",
            Action::ChangeLevels => "change the levels of",
        }
    }
}

/// The partitions a user holds, for messages.
fn held_list(held: &[u8]) -> String {
    if held.is_empty() {
        return "none".into();
    }
    held.iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why an actor may not do something. Messages name the rule, partition and levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// The actor has no authority in a partition involved.
    #[error("{actor} has no authority in partition {partition}; {}", action.partitions_rule())]
    PartitionNotHeld {
        /// Who acts.
        actor: String,
        /// The partition.
        partition: u8,
        /// What they attempted.
        action: Action,
    },
    /// Operators and duress users add nobody and change no code.
    #[error(
        "{actor} is {level} in partition {partition}: only installer, master and manager codes may add or delete users, or add, change or delete codes"
    )]
    CannotManage {
        /// Who acts.
        actor: String,
        /// Their level there.
        level: Level,
        /// The partition.
        partition: u8,
    },
    /// Users are only added at a strictly lower authority.
    #[error(
        "{actor} is {level} in partition {partition} and may only add users below that level, not {requested}"
    )]
    NotLower {
        /// Who acts.
        actor: String,
        /// Their level.
        level: Level,
        /// Requested level.
        requested: Level,
        /// The partition.
        partition: u8,
    },
    /// Codes (and users) of the same or higher level are out of reach.
    #[error(
        "{actor} is {level} in partition {partition} and may not {} a user who is {target}", action.verb()
    )]
    TargetNotLower {
        /// Who acts.
        actor: String,
        /// Their level.
        level: Level,
        /// The target's level.
        target: Level,
        /// The partition.
        partition: u8,
        /// What they attempted.
        action: Action,
    },
    /// Operators may not change even their own code.
    #[error(
        "{actor} is {level} in partition {partition}: only masters and managers may change their own code"
    )]
    OwnCodeLocked {
        /// Who acts.
        actor: String,
        /// Their level.
        level: Level,
        /// The partition.
        partition: u8,
    },
    /// The installer is user 001 and there is exactly one.
    #[error("level 0 (installer) cannot be granted: the installer is user 001 of the panel")]
    InstallerNotGrantable,
    /// A code is changed only from the partition it was created in.
    #[error(
        "this code was created in partition {created}; it can be changed or deleted only from partition {created}, not {acting}: send `{ACTING_PARTITION_HEADER}: {created}`"
    )]
    WrongPartition {
        /// Where it was created.
        created: u8,
        /// Where the actor acts from.
        acting: u8,
    },
    /// A user acts only from a partition in which they hold a level.
    #[error(
        "{actor} holds no level in partition {partition}, so cannot act from it: the {ACTING_PARTITION_HEADER} header must name a partition they hold (they hold: {})",
        held_list(held)
    )]
    ActingPartitionNotHeld {
        /// Who acts.
        actor: String,
        /// The partition named in the header.
        partition: u8,
        /// The partitions they hold.
        held: Vec<u8>,
    },
    /// A user holding several partitions must say which one they act from.
    #[error(
        "{actor} holds several partitions ({}): name the one you act from with the {ACTING_PARTITION_HEADER} header",
        held_list(held)
    )]
    ActingPartitionNeeded {
        /// Who acts.
        actor: String,
        /// The partitions they hold.
        held: Vec<u8>,
    },
    /// A user with no level anywhere may change nothing.
    #[error(
        "{actor} holds no authority level in any partition: only installer, master and manager codes may add users or change codes"
    )]
    NoLevel {
        /// Who acts.
        actor: String,
    },
    /// A code programmed at the panel has a level keyplane cannot know.
    #[error(
        "{actor} cannot remove a code programmed at the panel: its authority level is unknown and may be the same as or higher than theirs; the installer (the dealer, calling without keyplane-acting-user) removes it, or a user claims it first"
    )]
    LocalPanelCode {
        /// Who acts.
        actor: String,
    },
    /// Configuring the site is installer work (program mode).
    #[error(
        "{what} is installer work: a site user acting through the back office (keyplane-acting-user {user}) may not do it; the dealer calls without keyplane-acting-user"
    )]
    InstallerOnly {
        /// The act, e.g. "adding a device".
        what: String,
        /// The acting user named in the header.
        user: String,
    },
    /// Nobody deletes themselves.
    #[error("{actor} cannot delete themselves")]
    SelfDelete {
        /// Who acts.
        actor: String,
    },
    /// Deleting a user deletes their codes, so each code must be deletable too.
    #[error("deleting this user deletes their code {code}, and {reason}")]
    UserCode {
        /// The code's resource name.
        code: String,
        /// Why that code may not be deleted.
        reason: Box<AuthorityError>,
    },
}

impl AuthorityError {
    /// Whether the request lacks something the caller can add (the acting-partition
    /// header) rather than being forbidden outright.
    pub fn is_precondition(&self) -> bool {
        match self {
            AuthorityError::ActingPartitionNeeded { .. } => true,
            AuthorityError::UserCode { reason, .. } => reason.is_precondition(),
            _ => false,
        }
    }
}

/// What the rules need to know of one existing code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeFacts {
    /// Its resource name (for messages).
    pub name: String,
    /// The partitions it involves: its panel partitions and those of its devices.
    pub partitions: Vec<u8>,
    /// The partition it was created in, if recorded.
    pub created: Option<u8>,
}

impl Actor {
    fn label(&self) -> String {
        match self {
            Actor::Dealer => "the dealer".into(),
            Actor::User { name, .. } => format!("user {name}"),
        }
    }

    /// The actor's level in `partition`, if any.
    pub fn level(&self, partition: u8) -> Option<Level> {
        match self {
            Actor::Dealer => Some(Level::Installer),
            Actor::User { authorities, .. } => authorities.get(&partition).copied(),
        }
    }

    fn level_in(&self, partition: u8, action: Action) -> Result<Level, AuthorityError> {
        self.level(partition)
            .ok_or_else(|| AuthorityError::PartitionNotHeld {
                actor: self.label(),
                partition,
                action,
            })
    }

    fn held(&self) -> Vec<u8> {
        match self {
            Actor::Dealer => Vec::new(),
            Actor::User { authorities, .. } => authorities.keys().copied().collect(),
        }
    }

    /// May this actor act from the partition named in the acting-partition header?
    /// A user only from one where they hold a level; the dealer (installer) from any.
    pub fn check_acting_partition(&self, header: Option<u8>) -> Result<(), AuthorityError> {
        match (self, header) {
            (Actor::User { .. }, Some(partition)) if self.level(partition).is_none() => {
                Err(AuthorityError::ActingPartitionNotHeld {
                    actor: self.label(),
                    partition,
                    held: self.held(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The partition the actor acts from when one is needed: the header, else a
    /// user's only partition; None for the dealer (or a user holding none) without
    /// the header. A user holding several must name one.
    pub fn acting_partition(&self, header: Option<u8>) -> Result<Option<u8>, AuthorityError> {
        self.check_acting_partition(header)?;
        if header.is_some() {
            return Ok(header);
        }
        match self.held().as_slice() {
            [] => Ok(None),
            [only] => Ok(Some(*only)),
            held => Err(AuthorityError::ActingPartitionNeeded {
                actor: self.label(),
                held: held.to_vec(),
            }),
        }
    }

    /// The partition a new code is recorded as created in: where the actor acts
    /// from, else the first partition the code involves.
    pub fn creation_partition(
        &self,
        header: Option<u8>,
        involved: &[u8],
    ) -> Result<Option<u8>, AuthorityError> {
        // A user holding several partitions names the one they act from, as they must
        // to change the code later; only the dealer falls back to the code's own.
        let acting = self.acting_partition(header)?;
        Ok(acting.or_else(|| involved.first().copied()))
    }

    /// A user actor must hold a level that manages users (0-2) somewhere at all.
    fn check_manages_somewhere(&self) -> Result<(), AuthorityError> {
        let Actor::User { authorities, .. } = self else {
            return Ok(());
        };
        if authorities.values().any(|l| l.manages_users()) {
            return Ok(());
        }
        Err(match authorities.iter().next() {
            Some((&partition, &level)) => AuthorityError::CannotManage {
                actor: self.label(),
                level,
                partition,
            },
            None => AuthorityError::NoLevel {
                actor: self.label(),
            },
        })
    }

    /// May this actor create (or re-grant) a user with `requested` levels?
    pub fn check_grant(&self, requested: &Authorities) -> Result<(), AuthorityError> {
        // Asking for no level at all is still adding or changing a user.
        self.check_manages_somewhere()?;
        for (&partition, &level) in requested {
            if level == Level::Installer {
                return Err(AuthorityError::InstallerNotGrantable);
            }
            let own = self.level_in(partition, Action::Grant)?;
            if !own.manages_users() {
                return Err(AuthorityError::CannotManage {
                    actor: self.label(),
                    level: own,
                    partition,
                });
            }
            if level <= own {
                return Err(AuthorityError::NotLower {
                    actor: self.label(),
                    level: own,
                    requested: level,
                    partition,
                });
            }
        }
        Ok(())
    }

    /// May this actor add, change or delete a code of a user holding `target` levels
    /// in `partitions`? `is_self` when the code is the actor's own. With no partition
    /// involved (a lock outside any partition), a user actor still needs a level that
    /// could make the change somewhere.
    pub fn check_code_change(
        &self,
        target: &Authorities,
        partitions: &[u8],
        is_self: bool,
    ) -> Result<(), AuthorityError> {
        self.check_levels(target, partitions, is_self, Action::ChangeCode)
    }

    /// May this actor change the levels of a user holding `target` levels, in
    /// `partitions` (the user's partitions before and after)? Nobody re-grants their
    /// own levels: the target must be strictly below, as for their codes.
    pub fn check_level_change(
        &self,
        target: &Authorities,
        partitions: &[u8],
    ) -> Result<(), AuthorityError> {
        self.check_levels(target, partitions, false, Action::ChangeLevels)
    }

    fn check_levels(
        &self,
        target: &Authorities,
        partitions: &[u8],
        is_self: bool,
        action: Action,
    ) -> Result<(), AuthorityError> {
        if partitions.is_empty()
            && let Actor::User { authorities, .. } = self
        {
            let allowed = |l: &Level| {
                if is_self {
                    l.may_change_own_code()
                } else {
                    l.manages_users()
                }
            };
            if !authorities.values().any(allowed) {
                let Some((&partition, &level)) = authorities.iter().next() else {
                    return Err(AuthorityError::NoLevel {
                        actor: self.label(),
                    });
                };
                return Err(if is_self {
                    AuthorityError::OwnCodeLocked {
                        actor: self.label(),
                        level,
                        partition,
                    }
                } else {
                    AuthorityError::CannotManage {
                        actor: self.label(),
                        level,
                        partition,
                    }
                });
            }
        }
        for &partition in partitions {
            let own = self.level_in(partition, action)?;
            if is_self {
                if !own.may_change_own_code() {
                    return Err(AuthorityError::OwnCodeLocked {
                        actor: self.label(),
                        level: own,
                        partition,
                    });
                }
                continue;
            }
            if !own.manages_users() {
                return Err(AuthorityError::CannotManage {
                    actor: self.label(),
                    level: own,
                    partition,
                });
            }
            if let Some(&theirs) = target.get(&partition)
                && theirs <= own
            {
                return Err(AuthorityError::TargetNotLower {
                    actor: self.label(),
                    level: own,
                    target: theirs,
                    partition,
                    action,
                });
            }
        }
        Ok(())
    }

    /// May this actor change or delete an existing `code` of a user holding `target`
    /// levels, acting from the partition in `header`? The levels rule over every
    /// partition the code involves, then the partition-of-origin rule. The dealer
    /// without the header acts as installer from anywhere.
    pub fn check_code_existing(
        &self,
        target: &Authorities,
        code: &CodeFacts,
        header: Option<u8>,
        is_self: bool,
    ) -> Result<(), AuthorityError> {
        self.check_acting_partition(header)?;
        self.check_code_change(target, &code.partitions, is_self)?;
        if let Some(created) = code.created
            && let Some(acting) = self.acting_partition(header)?
        {
            check_partition_of_origin(created, acting)?;
        }
        Ok(())
    }

    /// May this actor remove a code programmed at a device (a LOCAL code)? Nobody
    /// knows whose it is: on a panel it may be a master's or the installer's, so only
    /// the installer removes it; on a lock or door (no levels there) it takes a level
    /// that may delete others' codes in the device's partition, or anywhere when the
    /// device has none.
    pub fn check_local_code_remove(
        &self,
        panel: bool,
        device_partition: Option<u8>,
        header: Option<u8>,
    ) -> Result<(), AuthorityError> {
        self.check_acting_partition(header)?;
        if *self == Actor::Dealer {
            return Ok(());
        }
        if panel {
            return Err(AuthorityError::LocalPanelCode {
                actor: self.label(),
            });
        }
        let partitions: Vec<u8> = device_partition.into_iter().collect();
        self.check_code_change(&Authorities::new(), &partitions, false)
    }

    /// May this actor delete a user holding `target` levels and `codes`? Deleting a
    /// user deletes their codes, so each code must pass every rule deleting it alone
    /// would (`check_code_existing`), on top of the user's own levels being in reach.
    pub fn check_user_delete(
        &self,
        target: &Authorities,
        codes: &[CodeFacts],
        header: Option<u8>,
        is_self: bool,
    ) -> Result<(), AuthorityError> {
        self.check_acting_partition(header)?;
        if is_self {
            return Err(AuthorityError::SelfDelete {
                actor: self.label(),
            });
        }
        let partitions: Vec<u8> = target.keys().copied().collect();
        self.check_levels(target, &partitions, false, Action::DeleteUser)?;
        for code in codes {
            self.check_code_existing(target, code, header, false)
                .map_err(|e| AuthorityError::UserCode {
                    code: code.name.clone(),
                    reason: Box::new(e),
                })?;
        }
        Ok(())
    }
}

/// Site configuration (partitions, devices, plans of doors, holidays, lockdown, agent
/// tokens) is what only the installer does at a panel (program mode): the dealer may,
/// a site user acting through the back office (`acting_user`) may not. Reads are not
/// configuration.
pub fn check_installer_only(acting_user: Option<&str>, what: &str) -> Result<(), AuthorityError> {
    match acting_user {
        None => Ok(()),
        Some(user) => Err(AuthorityError::InstallerOnly {
            what: what.to_owned(),
            user: user.to_owned(),
        }),
    }
}

/// At the panel: may a code of `level` disarm a partition, given whether that same
/// code armed it? Master and lower codes are interchangeable, except operator C (the
/// babysitter) and the installer, who disarm only what they armed themselves.
pub fn may_disarm(level: Level, armed_by_this_code: bool) -> bool {
    match level {
        Level::Installer | Level::OperatorC => armed_by_this_code,
        _ => true,
    }
}

/// A code is changed or deleted only from the partition it was created in.
pub fn check_partition_of_origin(created: u8, acting: u8) -> Result<(), AuthorityError> {
    if created == acting {
        Ok(())
    } else {
        Err(AuthorityError::WrongPartition { created, acting })
    }
}

/// Open/close reporting of a new user: the installer (dealer) chooses; a user added
/// by a master or manager gets the adder's setting.
pub fn open_close_for_new_user(actor_setting: Option<bool>, requested: bool) -> bool {
    actor_setting.unwrap_or(requested)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Level::*;

    fn user(levels: &[(u8, Level)]) -> Actor {
        Actor::User {
            name: "u".into(),
            authorities: levels.iter().copied().collect(),
        }
    }

    fn auth(levels: &[(u8, Level)]) -> Authorities {
        levels.iter().copied().collect()
    }

    #[test]
    fn level_changes_speak_of_levels() {
        let e = user(&[(1, Manager)])
            .check_level_change(&auth(&[(1, Manager)]), &[1])
            .expect_err("own level");
        assert!(e.to_string().contains("change the levels of"), "{e}");
        let e = user(&[(1, Master)])
            .check_level_change(&auth(&[(1, Manager)]), &[1, 2])
            .expect_err("partition 2 not held");
        assert!(e.to_string().contains("change levels only"), "{e}");
        assert!(
            user(&[(1, Master)])
                .check_level_change(&auth(&[(1, Manager)]), &[1])
                .is_ok()
        );
    }

    #[test]
    fn configuration_is_installer_work() {
        assert!(check_installer_only(None, "adding a device").is_ok());
        let e = check_installer_only(Some("sites/s/users/u"), "adding a device")
            .expect_err("a site user configures nothing");
        let text = e.to_string();
        assert!(
            text.contains("adding a device") && text.contains("installer"),
            "{text}"
        );
    }

    #[test]
    fn removing_local_codes_table() {
        // (what, actor, panel?, device partition, header, allowed)
        type Case = (&'static str, Actor, bool, Option<u8>, Option<u8>, bool);
        let cases: Vec<Case> = vec![
            ("dealer, panel", Actor::Dealer, true, Some(1), None, true),
            ("dealer, lock", Actor::Dealer, false, Some(1), None, true),
            (
                "master, panel",
                user(&[(1, Master)]),
                true,
                Some(1),
                Some(1),
                false,
            ),
            (
                "master, lock of 1",
                user(&[(1, Master)]),
                false,
                Some(1),
                Some(1),
                true,
            ),
            (
                "manager, lock of 1",
                user(&[(1, Manager)]),
                false,
                Some(1),
                None,
                true,
            ),
            (
                "operator A, lock",
                user(&[(1, OperatorA)]),
                false,
                Some(1),
                None,
                false,
            ),
            (
                "duress, lock",
                user(&[(1, Duress)]),
                false,
                Some(1),
                None,
                false,
            ),
            (
                "master of 2, lock of 1",
                user(&[(2, Master)]),
                false,
                Some(1),
                None,
                false,
            ),
            (
                "master, lock in no partition",
                user(&[(2, Master)]),
                false,
                None,
                None,
                true,
            ),
            (
                "operator, lock in no partition",
                user(&[(2, OperatorB)]),
                false,
                None,
                None,
                false,
            ),
            (
                "master, header not held",
                user(&[(1, Master)]),
                false,
                Some(1),
                Some(2),
                false,
            ),
        ];
        for (what, actor, panel, partition, header, allowed) in cases {
            let got = actor.check_local_code_remove(panel, partition, header);
            assert_eq!(got.is_ok(), allowed, "{what}: {got:?}");
        }
        let panel = user(&[(1, Master)])
            .check_local_code_remove(true, Some(1), None)
            .expect_err("panel");
        assert!(panel.to_string().contains("installer"), "{panel}");
    }

    #[test]
    fn levels_round_trip() {
        for n in 0..=6 {
            assert_eq!(Level::from_number(n).map(Level::number), Some(n));
        }
        assert_eq!(Level::from_number(7), None);
        assert_eq!(Level::from_number(-1), None);
    }

    #[test]
    fn adding_users_table() {
        let master1 = user(&[(1, Master)]);
        let manager1 = user(&[(1, Manager)]);
        let cases: Vec<(&str, Actor, Authorities, bool)> = vec![
            (
                "dealer adds a master",
                Actor::Dealer,
                auth(&[(1, Master)]),
                true,
            ),
            (
                "dealer adds anyone below installer",
                Actor::Dealer,
                auth(&[(2, Duress)]),
                true,
            ),
            (
                "nobody grants installer",
                Actor::Dealer,
                auth(&[(1, Installer)]),
                false,
            ),
            (
                "master adds manager",
                master1.clone(),
                auth(&[(1, Manager)]),
                true,
            ),
            (
                "master adds a user with no level yet",
                master1.clone(),
                auth(&[]),
                true,
            ),
            (
                "duress adds a user with no level",
                user(&[(1, Duress)]),
                auth(&[]),
                false,
            ),
            (
                "operator A adds a user with no level",
                user(&[(1, OperatorA)]),
                auth(&[]),
                false,
            ),
            (
                "a user with no level adds a user with no level",
                user(&[]),
                auth(&[]),
                false,
            ),
            (
                "master adds operator C",
                master1.clone(),
                auth(&[(1, OperatorC)]),
                true,
            ),
            (
                "master adds duress",
                master1.clone(),
                auth(&[(1, Duress)]),
                true,
            ),
            (
                "master cannot add master",
                master1.clone(),
                auth(&[(1, Master)]),
                false,
            ),
            (
                "master cannot add installer",
                master1.clone(),
                auth(&[(1, Installer)]),
                false,
            ),
            (
                "manager adds operator A",
                manager1.clone(),
                auth(&[(1, OperatorA)]),
                true,
            ),
            (
                "manager cannot add manager",
                manager1.clone(),
                auth(&[(1, Manager)]),
                false,
            ),
            (
                "manager cannot add master",
                manager1.clone(),
                auth(&[(1, Master)]),
                false,
            ),
            (
                "operator A adds nobody",
                user(&[(1, OperatorA)]),
                auth(&[(1, OperatorB)]),
                false,
            ),
            (
                "operator C adds nobody",
                user(&[(1, OperatorC)]),
                auth(&[(1, Duress)]),
                false,
            ),
            (
                "duress adds nobody",
                user(&[(1, Duress)]),
                auth(&[(1, Duress)]),
                false,
            ),
            (
                "partition not held",
                master1.clone(),
                auth(&[(2, OperatorA)]),
                false,
            ),
            (
                "subset of partitions",
                user(&[(1, Master), (2, Master)]),
                auth(&[(2, OperatorA)]),
                true,
            ),
            (
                "one partition out of reach",
                master1.clone(),
                auth(&[(1, OperatorA), (2, OperatorA)]),
                false,
            ),
            (
                "per-partition levels",
                user(&[(1, Master), (2, Manager)]),
                auth(&[(1, Manager), (2, Manager)]),
                false,
            ),
        ];
        for (what, actor, requested, ok) in cases {
            assert_eq!(actor.check_grant(&requested).is_ok(), ok, "{what}");
        }
    }

    #[test]
    fn changing_codes_table() {
        // (what, actor, target's levels, partitions involved, own code, allowed)
        type Case = (&'static str, Actor, Authorities, &'static [u8], bool, bool);
        let cases: Vec<Case> = vec![
            (
                "dealer changes a master",
                Actor::Dealer,
                auth(&[(1, Master)]),
                &[1],
                false,
                true,
            ),
            (
                "master changes a manager",
                user(&[(1, Master)]),
                auth(&[(1, Manager)]),
                &[1],
                false,
                true,
            ),
            (
                "master changes another master",
                user(&[(1, Master)]),
                auth(&[(1, Master)]),
                &[1],
                false,
                false,
            ),
            (
                "manager changes operator",
                user(&[(1, Manager)]),
                auth(&[(1, OperatorB)]),
                &[1],
                false,
                true,
            ),
            (
                "manager changes master",
                user(&[(1, Manager)]),
                auth(&[(1, Master)]),
                &[1],
                false,
                false,
            ),
            (
                "manager changes manager",
                user(&[(1, Manager)]),
                auth(&[(1, Manager)]),
                &[1],
                false,
                false,
            ),
            (
                "master changes own code",
                user(&[(1, Master)]),
                auth(&[(1, Master)]),
                &[1],
                true,
                true,
            ),
            (
                "manager changes own code",
                user(&[(1, Manager)]),
                auth(&[(1, Manager)]),
                &[1],
                true,
                true,
            ),
            (
                "operator A cannot change own",
                user(&[(1, OperatorA)]),
                auth(&[(1, OperatorA)]),
                &[1],
                true,
                false,
            ),
            (
                "operator C cannot change own",
                user(&[(1, OperatorC)]),
                auth(&[(1, OperatorC)]),
                &[1],
                true,
                false,
            ),
            (
                "operator changes nobody",
                user(&[(1, OperatorA)]),
                auth(&[(1, OperatorC)]),
                &[1],
                false,
                false,
            ),
            (
                "outside own partitions",
                user(&[(1, Master)]),
                auth(&[(2, OperatorA)]),
                &[2],
                false,
                false,
            ),
            (
                "target without level there",
                user(&[(1, Master)]),
                auth(&[]),
                &[1],
                false,
                true,
            ),
        ];
        for (what, actor, target, partitions, is_self, ok) in cases {
            assert_eq!(
                actor
                    .check_code_change(&target, partitions, is_self)
                    .is_ok(),
                ok,
                "{what}"
            );
        }
    }

    #[test]
    fn disarm_table() {
        let cases = [
            (Master, false, true),
            (Manager, false, true),
            (OperatorA, false, true),
            (OperatorB, false, true),
            (OperatorC, false, false),
            (OperatorC, true, true),
            (Installer, false, false),
            (Installer, true, true),
            (Duress, false, true),
        ];
        for (level, same, ok) in cases {
            assert_eq!(
                may_disarm(level, same),
                ok,
                "{level} armed by same code: {same}"
            );
        }
    }

    #[test]
    fn partition_of_origin_and_reporting() {
        assert!(check_partition_of_origin(1, 1).is_ok());
        let err = check_partition_of_origin(1, 2).expect_err("other partition");
        assert!(err.to_string().contains("partition 1"), "{err}");
        assert!(open_close_for_new_user(None, true));
        assert!(!open_close_for_new_user(None, false));
        assert!(
            open_close_for_new_user(Some(true), false),
            "inherits the master's setting"
        );
        assert!(!open_close_for_new_user(Some(false), true));
    }

    #[test]
    fn acting_partition_table() {
        let multi = user(&[(1, Master), (2, Manager)]);
        // (what, actor, header, acting partition or None when refused)
        type Case = (&'static str, Actor, Option<u8>, Option<Option<u8>>);
        let cases: Vec<Case> = vec![
            ("dealer, no header", Actor::Dealer, None, Some(None)),
            (
                "dealer from any partition",
                Actor::Dealer,
                Some(7),
                Some(Some(7)),
            ),
            (
                "user from a held partition",
                multi.clone(),
                Some(2),
                Some(Some(2)),
            ),
            (
                "user from a partition not held",
                user(&[(1, Manager)]),
                Some(2),
                None,
            ),
            (
                "operator from a partition not held",
                user(&[(1, OperatorA)]),
                Some(3),
                None,
            ),
            ("user with no level, any header", user(&[]), Some(1), None),
            (
                "single partition, no header",
                user(&[(3, Master)]),
                None,
                Some(Some(3)),
            ),
            ("several partitions, no header", multi.clone(), None, None),
            ("no partition, no header", user(&[]), None, Some(None)),
        ];
        for (what, actor, header, want) in cases {
            assert_eq!(actor.acting_partition(header).ok(), want, "{what}");
            let held_ok = !matches!(
                actor.check_acting_partition(header),
                Err(AuthorityError::ActingPartitionNotHeld { .. })
            );
            let not_held = header.is_some() && want.is_none();
            assert_eq!(held_ok, !not_held, "{what}: header check");
        }
        let err = user(&[(1, Manager), (4, Master)])
            .check_acting_partition(Some(2))
            .expect_err("not held");
        let msg = err.to_string();
        for needle in ["keyplane-acting-partition", "partition 2", "hold: 1, 4"] {
            assert!(msg.contains(needle), "{msg} should mention {needle}");
        }
        assert!(!err.is_precondition());
        let err = multi.acting_partition(None).expect_err("several");
        assert!(err.is_precondition(), "the caller can add the header");
        assert!(
            err.to_string().contains("keyplane-acting-partition"),
            "{err}"
        );
    }

    #[test]
    fn creation_partition_table() {
        // (what, actor, header, involved partitions, recorded partition; None: refused)
        type Case = (
            &'static str,
            Actor,
            Option<u8>,
            &'static [u8],
            Option<Option<u8>>,
        );
        let cases: Vec<Case> = vec![
            (
                "dealer names one",
                Actor::Dealer,
                Some(2),
                &[1],
                Some(Some(2)),
            ),
            (
                "dealer names none",
                Actor::Dealer,
                None,
                &[3, 4],
                Some(Some(3)),
            ),
            (
                "dealer, nothing involved",
                Actor::Dealer,
                None,
                &[],
                Some(None),
            ),
            (
                "user's only partition",
                user(&[(1, Master)]),
                None,
                &[],
                Some(Some(1)),
            ),
            (
                "user's header",
                user(&[(1, Master), (2, Master)]),
                Some(2),
                &[1],
                Some(Some(2)),
            ),
            (
                "several, no header",
                user(&[(1, Master), (2, Master)]),
                None,
                &[2],
                None,
            ),
            ("header not held", user(&[(1, Master)]), Some(2), &[1], None),
        ];
        for (what, actor, header, involved, want) in cases {
            assert_eq!(
                actor.creation_partition(header, involved).ok(),
                want,
                "{what}"
            );
        }
    }

    fn code(partitions: &[u8], created: Option<u8>) -> CodeFacts {
        CodeFacts {
            name: "sites/s/users/u/credentials/c".into(),
            partitions: partitions.to_vec(),
            created,
        }
    }

    #[test]
    fn existing_codes_and_deleting_users_table() {
        let both = user(&[(1, Master), (2, Master)]);
        let master1 = user(&[(1, Master)]);
        let op = auth(&[(1, OperatorA)]);
        let op12 = auth(&[(1, OperatorA), (2, OperatorA)]);
        // (what, actor, target, their codes, header, every code changeable, user deletable)
        type Case = (
            &'static str,
            Actor,
            Authorities,
            Vec<CodeFacts>,
            Option<u8>,
            bool,
            bool,
        );
        let cases: Vec<Case> = vec![
            (
                "from the partition of origin",
                both.clone(),
                op12.clone(),
                vec![code(&[1], Some(1))],
                Some(1),
                true,
                true,
            ),
            (
                "from another partition",
                both.clone(),
                op12.clone(),
                vec![code(&[1], Some(1))],
                Some(2),
                false,
                false,
            ),
            (
                "dealer from another partition",
                Actor::Dealer,
                op12.clone(),
                vec![code(&[1], Some(1))],
                Some(2),
                false,
                false,
            ),
            (
                "dealer with no header",
                Actor::Dealer,
                op12.clone(),
                vec![code(&[1], Some(1))],
                None,
                true,
                true,
            ),
            (
                "only partition is the origin",
                master1.clone(),
                op.clone(),
                vec![code(&[1], Some(1))],
                None,
                true,
                true,
            ),
            (
                "several partitions, no header",
                both.clone(),
                op12.clone(),
                vec![code(&[1], Some(1))],
                None,
                false,
                false,
            ),
            (
                "code without recorded origin",
                both.clone(),
                op12.clone(),
                vec![code(&[1], None)],
                Some(2),
                true,
                true,
            ),
            (
                "code on a partition not held",
                master1.clone(),
                op.clone(),
                vec![code(&[2], Some(2))],
                None,
                false,
                false,
            ),
            (
                "code on a lock outside partitions",
                master1.clone(),
                op.clone(),
                vec![code(&[], None)],
                None,
                true,
                true,
            ),
            (
                "one code of several out of reach",
                master1.clone(),
                op.clone(),
                vec![code(&[1], Some(1)), code(&[2], Some(1))],
                None,
                false,
                false,
            ),
            (
                "user with no codes",
                master1.clone(),
                op.clone(),
                vec![],
                None,
                true,
                true,
            ),
            (
                "user holding a partition not held",
                master1.clone(),
                op12.clone(),
                vec![],
                None,
                true,
                false,
            ),
            (
                "user at the same level",
                master1.clone(),
                auth(&[(1, Master)]),
                vec![],
                None,
                true,
                false,
            ),
            (
                "operator deletes nobody",
                user(&[(1, OperatorA)]),
                auth(&[(1, OperatorC)]),
                vec![],
                None,
                true,
                false,
            ),
            (
                "header not held",
                master1.clone(),
                op.clone(),
                vec![code(&[1], Some(1))],
                Some(2),
                false,
                false,
            ),
        ];
        for (what, actor, target, codes, header, change_ok, delete_ok) in cases {
            assert_eq!(
                codes
                    .iter()
                    .all(|c| actor.check_code_existing(&target, c, header, false).is_ok()),
                change_ok,
                "{what}: codes"
            );
            assert_eq!(
                actor
                    .check_user_delete(&target, &codes, header, false)
                    .is_ok(),
                delete_ok,
                "{what}: user delete"
            );
        }
        assert!(matches!(
            master1.check_user_delete(&op, &[], None, true),
            Err(AuthorityError::SelfDelete { .. })
        ));
    }

    #[test]
    fn refusals_name_what_was_attempted() {
        let master1 = user(&[(1, Master)]);
        // Deleting a user over a partition one lacks is not about granting.
        let msg = master1
            .check_user_delete(&auth(&[(1, OperatorA), (2, OperatorA)]), &[], None, false)
            .expect_err("partition 2")
            .to_string();
        assert!(
            msg.contains("partition 2") && msg.contains("delete"),
            "{msg}"
        );
        assert!(!msg.contains("grant"), "{msg}");
        let msg = master1
            .check_user_delete(&auth(&[(1, Master)]), &[], None, false)
            .expect_err("same level")
            .to_string();
        assert!(msg.contains("may not delete a user who is master"), "{msg}");
        // A code out of reach names the code and the rule.
        let msg = master1
            .check_user_delete(&auth(&[(1, OperatorA)]), &[code(&[2], None)], None, false)
            .expect_err("code in partition 2")
            .to_string();
        assert!(
            msg.contains("sites/s/users/u/credentials/c") && !msg.contains("grant"),
            "{msg}"
        );
        // Granting still speaks of granting.
        let msg = master1
            .check_grant(&auth(&[(2, OperatorA)]))
            .expect_err("grant")
            .to_string();
        assert!(msg.contains("grant"), "{msg}");
        // Operators are told they may not delete either.
        let msg = user(&[(1, OperatorB)])
            .check_user_delete(&auth(&[(1, OperatorC)]), &[], None, false)
            .expect_err("operator")
            .to_string();
        assert!(msg.contains("delete"), "{msg}");
        // The partition of origin names the header to send.
        let msg = check_partition_of_origin(1, 2)
            .expect_err("origin")
            .to_string();
        assert!(msg.contains("keyplane-acting-partition: 1"), "{msg}");
    }

    #[test]
    fn messages_name_rule_and_levels() {
        let err = user(&[(1, Manager)])
            .check_grant(&auth(&[(1, Master)]))
            .expect_err("denied");
        let msg = err.to_string();
        assert!(
            msg.contains("manager (level 2)") && msg.contains("master (level 1)"),
            "{msg}"
        );
    }
}
