//! Type-specific defaults and conversions, as kube-apiserver's registry strategies apply them
//! (Secrets' `stringData`, namespaces' name label, Services' cluster IPs, families and ports).

use serde_json::{Value, json};

use crate::resources::Resource;

/// Applies the defaults of `res`'s type to `obj` (`old`: the object before an update).
pub fn apply(res: &Resource, obj: &mut Value, old: Option<&Value>, next_ip: &mut u32) {
    match (res.group.as_str(), res.kind.as_str()) {
        ("", "Secret") => {
            if let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
                && let Some(sd) = sd.as_object()
            {
                use base64::Engine as _;
                for (k, v) in sd {
                    let b = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = b.into();
                }
            }
            if obj.get("type").is_none() {
                obj["type"] = "Opaque".into();
            }
        }
        ("", "Namespace") => {
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            if obj["status"].get("phase").is_none() {
                obj["status"]["phase"] = "Active".into();
            }
        }
        ("", "Service") => service(obj, old, next_ip),
        _ => {}
    }
}

fn service(obj: &mut Value, old: Option<&Value>, next_ip: &mut u32) {
    let spec = &mut obj["spec"];
    if spec.get("type").is_none() {
        spec["type"] = "ClusterIP".into();
    }
    let ty = spec["type"].as_str().unwrap_or_default().to_string();
    if ty != "ExternalName" {
        if spec.get("sessionAffinity").is_none() {
            spec["sessionAffinity"] = "None".into();
        }
        if spec.get("internalTrafficPolicy").is_none() {
            spec["internalTrafficPolicy"] = "Cluster".into();
        }
        let dual = matches!(
            spec["ipFamilyPolicy"].as_str(),
            Some("PreferDualStack" | "RequireDualStack")
        );
        if spec.get("ipFamilyPolicy").is_none() {
            spec["ipFamilyPolicy"] = "SingleStack".into();
        }
        if spec.get("ipFamilies").is_none() {
            spec["ipFamilies"] = if dual {
                json!(["IPv4", "IPv6"])
            } else {
                json!(["IPv4"])
            };
        }
        let kept = old.and_then(|o| o["spec"].get("clusterIPs").cloned());
        if spec.get("clusterIP").is_none() {
            match kept {
                Some(ips) => {
                    spec["clusterIP"] = ips[0].clone();
                    spec["clusterIPs"] = ips;
                }
                None => {
                    *next_ip += 1;
                    let n = *next_ip;
                    let v4 = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
                    let mut ips = vec![Value::String(v4.clone())];
                    if dual {
                        ips.push(format!("fd00:10:96::{n:x}").into());
                    }
                    spec["clusterIP"] = v4.into();
                    spec["clusterIPs"] = Value::Array(ips);
                }
            }
        }
    }
    if matches!(ty.as_str(), "LoadBalancer" | "NodePort")
        && spec.get("externalTrafficPolicy").is_none()
    {
        spec["externalTrafficPolicy"] = "Cluster".into();
    }
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports {
            if p.get("protocol").is_none() {
                p["protocol"] = "TCP".into();
            }
            if p.get("targetPort").is_none() {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
    if obj.get("status").is_none() {
        obj["status"] = json!({"loadBalancer": {}});
    }
}
