//! Parse a filter's JSON `config` into a typed struct. Errors carry the path of the field
//! that is wrong, so the message on `/filters` points at it:
//! `limits[0].burst: invalid type: string "ten", expected u32`.

use serde::de::DeserializeOwned;

/// Parse `json` (the text given to `configure`) into `T`; `null` is parsed as `{}` so that
/// a filter whose fields all have defaults needs no `config` at all.
pub fn parse<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    let text = if json.trim() == "null" { "{}" } else { json };
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path.is_empty() {
            format!("config: {}", e.inner())
        } else {
            format!("config.{path}: {}", e.inner())
        }
    })
}

/// A validation error for `field`: `config.FIELD: MESSAGE`.
pub fn field_error(field: &str, message: impl std::fmt::Display) -> String {
    format!("config.{field}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limit {
        burst: u32,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        #[serde(default)]
        limits: Vec<Limit>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse::<Cfg>(r#"{"limits": [{"burst": 1}, {"burst": "x"}]}"#).unwrap_err();
        assert!(e.starts_with("config.limits[1].burst: invalid type"), "{e}");
        let e = parse::<Cfg>(r#"{"limitz": []}"#).unwrap_err();
        assert!(e.contains("unknown field `limitz`"), "{e}");
        assert!(parse::<Cfg>("null").is_ok());
        let e = parse::<Cfg>("[").unwrap_err();
        assert!(e.starts_with("config: "), "{e}");
    }
}
