//! `IncrementalAlterConfigs` for one topic setting.
//!
//! rdkafka (0.39) only wraps the legacy `AlterConfigs`, which replaces a
//! topic's whole config (Kafka deprecated it for that reason, KIP-339);
//! the incremental API sets one key and leaves the rest alone. This
//! is the crate's only `unsafe` code: a direct call of librdkafka's admin
//! API through the bindings rdkafka re-exports.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::types::RDKafkaRespErr;

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// Read a C string owned by librdkafka.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string alive for this call.
unsafe fn text(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Set `key=value` on `topic` with `IncrementalAlterConfigs` (op SET),
/// waiting up to `timeout`. Blocking: call it off the async runtime.
///
/// `rk` must be the native handle of a live client; the caller keeps the
/// client alive for the duration of the call.
pub(crate) fn set_topic_config(
    rk: *mut rd::rd_kafka_t,
    topic: &str,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<(), String> {
    let (name, k, v) = (c_string(topic)?, c_string(key)?, c_string(value)?);
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128 - 1000) as i32;
    // SAFETY: every pointer passed to librdkafka is either created here and
    // destroyed before returning (resource, options, queue, event) or comes
    // from a CString that outlives the calls; librdkafka copies the
    // resource array when the request is queued.
    unsafe {
        let res = rd::rd_kafka_ConfigResource_new(
            rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
            name.as_ptr(),
        );
        if res.is_null() {
            return Err("could not allocate a config resource".into());
        }
        let err = rd::rd_kafka_ConfigResource_add_incremental_config(
            res,
            k.as_ptr(),
            rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
            v.as_ptr(),
        );
        if !err.is_null() {
            let msg = text(rd::rd_kafka_error_string(err));
            rd::rd_kafka_error_destroy(err);
            rd::rd_kafka_ConfigResource_destroy(res);
            return Err(msg);
        }
        let opts = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
        );
        let mut errbuf = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            opts,
            timeout_ms,
            errbuf.as_mut_ptr(),
            errbuf.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        let mut arr = [res];
        rd::rd_kafka_IncrementalAlterConfigs(rk, arr.as_mut_ptr(), 1, opts, queue);
        let ev = rd::rd_kafka_queue_poll(queue, timeout_ms + 1000);
        let out = if ev.is_null() {
            Err(format!("no answer within {timeout:?}"))
        } else if rd::rd_kafka_event_error(ev) != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            Err(text(rd::rd_kafka_event_error_string(ev)))
        } else {
            let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(ev);
            let mut cnt = 0usize;
            let list = if result.is_null() {
                std::ptr::null_mut()
            } else {
                rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut cnt)
            };
            let mut r = Ok(());
            for i in 0..cnt {
                let one = *list.add(i);
                if rd::rd_kafka_ConfigResource_error(one)
                    != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    let detail = text(rd::rd_kafka_ConfigResource_error_string(one));
                    let code = text(rd::rd_kafka_err2str(rd::rd_kafka_ConfigResource_error(one)));
                    r = Err(format!("{code}: {detail}"));
                }
            }
            r
        };
        if !ev.is_null() {
            rd::rd_kafka_event_destroy(ev);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(opts);
        rd::rd_kafka_ConfigResource_destroy(res);
        out
    }
}
