//! The agent's reports the status of slot assignments is decided from
//! (docs/STATUS.md): how a device answered each write, and whether the agent reaches
//! each device. Kept apart from the stream handling in [`crate::agent`], which only
//! hands the messages over.

use crate::error::store_status;
use keyplane_core::names::DeviceName;
use keyplane_core::status::WriteReport;
use keyplane_proto::convert as wire;
use keyplane_proto::v1 as pb;
use keyplane_store::Store;
use tonic::Status;
use uuid::Uuid;

fn device_of(site: Uuid, field: &str, name: &str) -> Result<Uuid, Status> {
    let device =
        DeviceName::parse(name).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    if device.site != site {
        return Err(Status::permission_denied(format!(
            "{field} {name} is not a device of sites/{site}"
        )));
    }
    Ok(device.device)
}

fn instant(t: Option<&prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    t.and_then(|t| wire::instant(t).ok())
        .unwrap_or_else(chrono::Utc::now)
}

/// Stores a write report. The device's reason is stored as the agent sent it: the
/// agent keeps PINs out of it, and keyplaned never logs it.
pub async fn write_report(store: &Store, site: Uuid, r: pb::SlotWriteReport) -> Result<(), Status> {
    let device = device_of(site, "write_report.device", &r.device)?;
    let slot = u16::try_from(r.slot)
        .map_err(|_| Status::invalid_argument("write_report.slot out of range"))?;
    let outcome = wire::write_outcome(&r)
        .map_err(|e| Status::invalid_argument(format!("write_report: {e}")))?;
    crate::metrics::apply_failure(&outcome);
    let report = WriteReport {
        revision: r.revision,
        at: instant(r.report_time.as_ref()),
        outcome,
    };
    let known = store
        .write_report_record(site, device, slot, r.clear, &report)
        .await
        .map_err(store_status)?;
    if !known {
        tracing::debug!(%site, device = %r.device, "write report for a device no longer at the site");
    }
    Ok(())
}

/// Stores whether the agent reaches a device.
pub async fn reachability(
    store: &Store,
    site: Uuid,
    r: pb::DeviceReachability,
) -> Result<(), Status> {
    let device = device_of(site, "reachability.device", &r.device)?;
    let last_contact = r
        .last_contact_time
        .as_ref()
        .and_then(|t| wire::instant(t).ok());
    store
        .reachability_record(site, device, r.reachable, last_contact)
        .await
        .map_err(store_status)?;
    Ok(())
}

/// Stores what an inventory device reports about itself (from Hello or later). A
/// report that makes no sense is refused with INVALID_ARGUMENT naming why; the
/// profile stays in force.
pub async fn inventory(store: &Store, site: Uuid, d: &pb::InventoryDevice) -> Result<(), Status> {
    let device = device_of(site, "inventory.device", &d.device)?;
    let Some(model) = keyplane_core::DeviceModel::find(&d.model) else {
        return Err(Status::invalid_argument(format!(
            "inventory.model {:?} is not a known model",
            d.model
        )));
    };
    let reported = d
        .constraints
        .as_ref()
        .map(wire::reported_constraints)
        .transpose()
        .map_err(|e| Status::invalid_argument(format!("inventory.constraints: {e}")))?;
    store
        .device_reported_record(site, device, model, reported.as_ref())
        .await
        .map_err(store_status)?;
    Ok(())
}
