//! The manager's forms as plain data: what a form posted, its validation into the operator's
//! merge patch, and the mapping of the operator's error fields back onto the form's fields.
//!
//! Validation here repeats the operator's rules on purpose: the user sees every mistake next
//! to its field at once, without a round trip, and the operator still judges the merged spec
//! (its 422 `field` is mapped back by [`form_field`]).

use std::collections::BTreeMap;

use cachepool_crds::pool::{CachePolicy, CachePool, ScalingMode};
use serde::Deserialize;
use serde_json::{Value, json};

/// Largest capacity per node the form accepts, in MiB (1 TiB).
pub const MAX_CAPACITY_MIB: u64 = 1 << 20;
/// Largest node count the form accepts.
pub const MAX_REPLICAS: u64 = 1000;

/// Errors by form field name (the input's `name`).
pub type FieldErrors = BTreeMap<&'static str, String>;

/// The capacity and policy form, as posted.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CacheForm {
    #[serde(rename = "capacityMiB", default)]
    pub capacity_mib: String,
    #[serde(default)]
    pub policy: String,
    #[serde(default)]
    pub csrf: String,
}

/// The scaling form, as posted.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingForm {
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub min_replicas: String,
    #[serde(default)]
    pub max_replicas: String,
    #[serde(default)]
    pub max_miss_rate: String,
    #[serde(default)]
    pub min_miss_rate: String,
    #[serde(default)]
    pub expand_ratio: String,
    #[serde(default)]
    pub shrink_ratio: String,
    #[serde(default)]
    pub csrf: String,
}

impl CacheForm {
    /// The form filled from the pool's spec.
    pub fn from_pool(pool: &CachePool) -> Self {
        CacheForm {
            capacity_mib: pool.spec.cache.capacity_mib.to_string(),
            policy: String::from(pool.spec.cache.policy.clone()),
            csrf: String::new(),
        }
    }

    /// The merge patch of `spec.cache`, or every field's error.
    pub fn patch(&self) -> Result<Value, FieldErrors> {
        let mut errors = FieldErrors::new();
        let capacity = integer(&self.capacity_mib, 1, MAX_CAPACITY_MIB)
            .map_err(|e| errors.insert("capacityMiB", e))
            .ok();
        let policy = self.policy.trim();
        if !CachePolicy::NAMES.contains(&policy) {
            errors.insert(
                "policy",
                format!("choose one of {}", CachePolicy::NAMES.join(", ")),
            );
        }
        match capacity {
            Some(capacity) if errors.is_empty() => Ok(json!({
                "spec": {"cache": {"capacityMiB": capacity, "policy": policy}}
            })),
            _ => Err(errors),
        }
    }
}

impl ScalingForm {
    /// The form filled from the pool's spec.
    pub fn from_pool(pool: &CachePool) -> Self {
        let s = &pool.spec.scaling;
        ScalingForm {
            mode: mode_name(s.mode).to_owned(),
            min_replicas: s.min_replicas.to_string(),
            max_replicas: s.max_replicas.to_string(),
            max_miss_rate: s.auto.max_miss_rate.to_string(),
            min_miss_rate: s.auto.min_miss_rate.to_string(),
            expand_ratio: s.auto.expand_ratio.to_string(),
            shrink_ratio: s.auto.shrink_ratio.to_string(),
            csrf: String::new(),
        }
    }

    /// The merge patch of `spec.scaling`, or every field's error.
    pub fn patch(&self) -> Result<Value, FieldErrors> {
        let mut errors = FieldErrors::new();
        let mode = self.mode.trim();
        if mode != "manual" && mode != "auto" {
            errors.insert("mode", "choose manual or auto".to_owned());
        }
        let min = integer(&self.min_replicas, 1, MAX_REPLICAS)
            .map_err(|e| errors.insert("minReplicas", e))
            .ok();
        let max = integer(&self.max_replicas, 1, MAX_REPLICAS)
            .map_err(|e| errors.insert("maxReplicas", e))
            .ok();
        if let (Some(min), Some(max)) = (min, max)
            && min > max
        {
            errors.insert(
                "maxReplicas",
                format!("must be at least the minimum ({min})"),
            );
        }
        let max_miss = rate(&self.max_miss_rate)
            .map_err(|e| errors.insert("maxMissRate", e))
            .ok();
        let min_miss = rate(&self.min_miss_rate)
            .map_err(|e| errors.insert("minMissRate", e))
            .ok();
        if let (Some(min), Some(max)) = (min_miss, max_miss)
            && min >= max
        {
            errors.insert(
                "minMissRate",
                format!("must be below the maximum miss rate ({max})"),
            );
        }
        let expand = number(&self.expand_ratio)
            .and_then(|v| {
                if v > 1.0 {
                    Ok(v)
                } else {
                    Err("must be greater than 1 (2 doubles the pool)".to_owned())
                }
            })
            .map_err(|e| errors.insert("expandRatio", e))
            .ok();
        let shrink = number(&self.shrink_ratio)
            .and_then(|v| {
                if v > 0.0 && v < 1.0 {
                    Ok(v)
                } else {
                    Err("must lie strictly between 0 and 1 (0.5 halves the pool)".to_owned())
                }
            })
            .map_err(|e| errors.insert("shrinkRatio", e))
            .ok();
        if !errors.is_empty() {
            return Err(errors);
        }
        match (min, max, max_miss, min_miss, expand, shrink) {
            (Some(min), Some(max), Some(max_miss), Some(min_miss), Some(expand), Some(shrink)) => {
                Ok(json!({"spec": {"scaling": {
                    "mode": mode,
                    "minReplicas": min,
                    "maxReplicas": max,
                    "auto": {
                        "maxMissRate": max_miss,
                        "minMissRate": min_miss,
                        "expandRatio": expand,
                        "shrinkRatio": shrink,
                    },
                }}}))
            }
            _ => Err(errors),
        }
    }
}

/// The spec's name of a scaling mode.
pub fn mode_name(mode: ScalingMode) -> &'static str {
    match mode {
        ScalingMode::Manual => "manual",
        ScalingMode::Auto => "auto",
    }
}

fn integer(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("enter a whole number from {min} to {max}"));
    }
    match text.parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Ok(_) => Err(format!("must lie within [{min}, {max}]")),
        Err(_) => Err(format!(
            "{text:?} is not a whole number; enter one from {min} to {max}"
        )),
    }
}

fn number(text: &str) -> Result<f64, String> {
    let text = text.trim();
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{text:?} is not a number; enter e.g. 0.5")),
    }
}

fn rate(text: &str) -> Result<f64, String> {
    let v = number(text)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("must lie within [0, 1] (a fraction of the reads)".to_owned())
    }
}

/// The form field an operator error field (`spec.scaling.auto.maxMissRate`) belongs to.
pub fn form_field(operator_field: &str) -> Option<&'static str> {
    let path = operator_field
        .strip_prefix("spec.")
        .unwrap_or(operator_field);
    Some(match path {
        "cache.capacityMiB" => "capacityMiB",
        // Not on the form: a too-large item limit is refused because the capacity the form
        // just lowered is below it, so the message belongs next to the capacity.
        "cache.maxItemSizeKiB" => "capacityMiB",
        "cache.policy" => "policy",
        "scaling.mode" => "mode",
        "scaling.minReplicas" => "minReplicas",
        "scaling.maxReplicas" => "maxReplicas",
        "scaling.auto.maxMissRate" => "maxMissRate",
        "scaling.auto.minMissRate" => "minMissRate",
        "scaling.auto.expandRatio" => "expandRatio",
        "scaling.auto.shrinkRatio" => "shrinkRatio",
        _ => return None,
    })
}

/// A byte count for people: `512 B`, `12.3 KiB`, `4.0 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaling() -> ScalingForm {
        ScalingForm {
            mode: "auto".into(),
            min_replicas: "1".into(),
            max_replicas: "4".into(),
            max_miss_rate: "0.4".into(),
            min_miss_rate: "0.1".into(),
            expand_ratio: "2".into(),
            shrink_ratio: "0.5".into(),
            csrf: String::new(),
        }
    }

    #[test]
    fn scaling_form_becomes_a_merge_patch_of_spec_scaling() {
        let patch = scaling().patch().unwrap();
        assert_eq!(
            patch,
            json!({"spec": {"scaling": {"mode": "auto", "minReplicas": 1, "maxReplicas": 4,
                "auto": {"maxMissRate": 0.4, "minMissRate": 0.1, "expandRatio": 2.0,
                         "shrinkRatio": 0.5}}}})
        );
    }

    #[test]
    fn scaling_form_errors_name_every_bad_field() {
        let mut form = scaling();
        form.max_miss_rate = "lots".into();
        form.expand_ratio = "1".into();
        form.shrink_ratio = "1.5".into();
        form.mode = "sometimes".into();
        let errors = form.patch().unwrap_err();
        assert!(errors["maxMissRate"].contains("not a number"), "{errors:?}");
        assert!(errors["expandRatio"].contains("greater than 1"));
        assert!(errors["shrinkRatio"].contains("between 0 and 1"));
        assert!(errors["mode"].contains("manual or auto"));
        assert_eq!(errors.len(), 4);

        let mut form = scaling();
        form.max_miss_rate = "1.5".into();
        assert!(form.patch().unwrap_err()["maxMissRate"].contains("[0, 1]"));

        let mut form = scaling();
        form.min_miss_rate = "0.4".into();
        assert!(form.patch().unwrap_err()["minMissRate"].contains("below"));

        let mut form = scaling();
        form.min_replicas = "5".into();
        assert!(form.patch().unwrap_err()["maxReplicas"].contains("at least"));

        let mut form = scaling();
        form.min_replicas = "0".into();
        assert!(form.patch().unwrap_err()["minReplicas"].contains("[1, 1000]"));
    }

    #[test]
    fn cache_form_becomes_a_merge_patch_of_spec_cache() {
        let form = CacheForm {
            capacity_mib: " 128 ".into(),
            policy: "sieve".into(),
            csrf: String::new(),
        };
        assert_eq!(
            form.patch().unwrap(),
            json!({"spec": {"cache": {"capacityMiB": 128, "policy": "sieve"}}})
        );
        let form = CacheForm {
            capacity_mib: "0".into(),
            policy: "fifo".into(),
            csrf: String::new(),
        };
        let errors = form.patch().unwrap_err();
        assert!(errors["capacityMiB"].contains("within"));
        assert!(errors["policy"].contains("lru, random, sieve"));
    }

    #[test]
    fn operator_fields_map_onto_form_fields() {
        assert_eq!(
            form_field("spec.scaling.auto.maxMissRate"),
            Some("maxMissRate")
        );
        assert_eq!(form_field("spec.scaling.minReplicas"), Some("minReplicas"));
        assert_eq!(form_field("spec.cache.capacityMiB"), Some("capacityMiB"));
        assert_eq!(form_field("scaling.auto.shrinkRatio"), Some("shrinkRatio"));
        assert_eq!(form_field("spec.cache.maxItemSizeKiB"), Some("capacityMiB"));
        assert_eq!(form_field("spec.scaling.replicas"), None);
        assert_eq!(form_field("spec.provider"), None);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(12_595), "12.3 KiB");
        assert_eq!(human_size(10 << 20), "10.0 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
