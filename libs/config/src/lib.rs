//! Configuration layering for every Switchboard process: defaults → optional TOML file → environment.
//!
//! One file describes the whole mesh (`deploy/switchboard.example.toml`): each service reads its own
//! section (`[router]`, `[gateway]`, …) plus the shared ones (`[telemetry]`, `[nats]`). Environment
//! variables override single values: `SWITCHBOARD__ROUTER__GRPC_ADDR=0.0.0.0:50054` sets
//! `router.grpc_addr`. A value that parses as TOML (number, boolean, array) takes that type, anything
//! else is a string.
//!
//! Environment is read once, in [`Source::load`]; tests build a [`Source`] from explicit parts and
//! never touch the process environment. Errors name the bad field by its full path.

use std::{collections::HashMap, path::Path};

use serde::de::DeserializeOwned;

/// Prefix of overriding environment variables.
pub const ENV_PREFIX: &str = "SWITCHBOARD__";
/// Environment variable naming the configuration file when no `--config` is given.
pub const CONFIG_FILE_ENV: &str = "SWITCHBOARD_CONFIG";

/// A configuration error. The message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("configuration file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    /// A field has the wrong type or is unknown.
    #[error("invalid configuration at `{path}`: {message}")]
    Field { path: String, message: String },
    /// A value is well-typed but not acceptable.
    #[error("invalid configuration at `{path}`: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    /// A validation error for `path`.
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The merged configuration tree (file overlaid with environment).
#[derive(Debug, Clone, Default)]
pub struct Source {
    root: toml::Table,
}

impl Source {
    /// Reads the file at `path` (or `$SWITCHBOARD_CONFIG`, or nothing) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(Into::into));
        let text = match &path {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let name = path.map(|p| p.display().to_string()).unwrap_or_default();
        Self::from_parts(&name, text.as_deref(), &env)
    }

    /// Builds a source from a file's text (if any) and an environment map.
    pub fn from_parts(
        file_name: &str,
        file_text: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut root = match file_text {
            Some(text) => text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: file_name.to_owned(),
                    message: e.to_string(),
                })?,
            None => toml::Table::new(),
        };
        let mut overrides: Vec<(&String, &String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        overrides.sort();
        for (key, value) in overrides {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(|part| part.to_ascii_lowercase())
                .collect();
            set_path(&mut root, &path, parse_env_value(value)).map_err(|message| {
                ConfigError::Field {
                    path: path.join("."),
                    message: format!("from environment variable {key}: {message}"),
                }
            })?;
        }
        Ok(Source { root })
    }

    /// A source from TOML text only (tests).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_parts("<inline>", Some(text), &HashMap::new())
    }

    /// Deserializes section `name` (missing section: `T::default()` via serde defaults).
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T, ConfigError> {
        let value = self
            .root
            .get(name)
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
        serde_path_to_error::deserialize(value).map_err(|error| {
            let inner = error.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                name.to_owned()
            } else {
                format!("{name}.{inner}")
            };
            ConfigError::Field {
                path,
                message: error.into_inner().to_string(),
            }
        })
    }

    /// Whether section `name` is present.
    pub fn has_section(&self, name: &str) -> bool {
        self.root.contains_key(name)
    }

    /// Sets a value at a dotted path (tests and embedders that build configs in code).
    pub fn set(&mut self, dotted: &str, value: impl Into<toml::Value>) -> Result<(), ConfigError> {
        let path: Vec<String> = dotted.split('.').map(str::to_owned).collect();
        set_path(&mut self.root, &path, value.into()).map_err(|message| ConfigError::Field {
            path: dotted.to_owned(),
            message,
        })
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty path".to_owned());
    };
    let mut table = root;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("`{part}` is not a table")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Svc {
        grpc_addr: String,
        port: u16,
        targets: Vec<Target>,
    }

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Target {
        provider: String,
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let env = HashMap::from([
            (
                "SWITCHBOARD__SVC__GRPC_ADDR".to_owned(),
                "0.0.0.0:1".to_owned(),
            ),
            ("SWITCHBOARD__SVC__PORT".to_owned(), "8080".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ]);
        let source = Source::from_parts(
            "f.toml",
            Some("[svc]\ngrpc_addr = \"127.0.0.1:9\"\nport = 1\n"),
            &env,
        )
        .unwrap();
        let svc: Svc = source.section("svc").unwrap();
        assert_eq!(svc.grpc_addr, "0.0.0.0:1");
        assert_eq!(svc.port, 8080);
    }

    #[test]
    fn missing_section_is_default() {
        let svc: Svc = Source::default().section("svc").unwrap();
        assert_eq!(svc, Svc::default());
    }

    #[test]
    fn errors_name_the_full_path_of_the_bad_field() {
        let source =
            Source::from_toml("[svc]\ntargets = [{ provider = \"a\" }, { provder = \"b\" }]\n")
                .unwrap();
        let error = source.section::<Svc>("svc").unwrap_err().to_string();
        assert!(error.contains("svc.targets[1]"), "{error}");
        assert!(error.contains("provder"), "{error}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let error = Source::from_parts("mesh.toml", Some("[svc\n"), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("mesh.toml"), "{error}");
    }
}
