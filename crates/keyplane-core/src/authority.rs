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

/// Why an actor may not do something. Messages name the rule, partition and levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// The actor has no authority in a partition involved.
    #[error(
        "{actor} has no authority in partition {partition}; users can only grant partitions they hold"
    )]
    PartitionNotHeld {
        /// Who acts.
        actor: String,
        /// The partition.
        partition: u8,
    },
    /// Operators and duress users add nobody and change no code.
    #[error(
        "{actor} is {level} in partition {partition}: only installer, master and manager codes may add users or change codes"
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
    /// Codes of the same or higher level are out of reach.
    #[error(
        "{actor} is {level} in partition {partition} and may not change or delete the code of a user who is {target}"
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
        "this code was created in partition {created}; it can be changed or deleted only from partition {created}, not {acting}"
    )]
    WrongPartition {
        /// Where it was created.
        created: u8,
        /// Where the actor acts from.
        acting: u8,
    },
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

    fn level_in(&self, partition: u8) -> Result<Level, AuthorityError> {
        self.level(partition)
            .ok_or_else(|| AuthorityError::PartitionNotHeld {
                actor: self.label(),
                partition,
            })
    }

    /// May this actor create (or re-grant) a user with `requested` levels?
    pub fn check_grant(&self, requested: &Authorities) -> Result<(), AuthorityError> {
        for (&partition, &level) in requested {
            if level == Level::Installer {
                return Err(AuthorityError::InstallerNotGrantable);
            }
            let own = self.level_in(partition)?;
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
                let (&partition, &level) =
                    authorities.iter().next().unwrap_or((&0, &Level::Duress));
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
            let own = self.level_in(partition)?;
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
                });
            }
        }
        Ok(())
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
