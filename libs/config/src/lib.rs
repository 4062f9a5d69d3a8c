//! Configuration layering for every Switchboard process: defaults → optional TOML file → environment.
//!
//! One file describes the whole mesh (`deploy/switchboard.example.toml`): each service reads its own
//! section (`[router]`, `[gateway]`, …) plus the shared ones (`[telemetry]`, `[nats]`). Environment
//! variables override single values: `SWITCHBOARD__ROUTER__GRPC_ADDR=0.0.0.0:50054` sets
//! `router.grpc_addr`. A field that wants a string takes the value as it is (a digits-only secret
//! stays a string); any other field takes what the value parses to as TOML (number, boolean,
//! array). An error about a value from the environment names the variable, never the value.
//!
//! Environment is read once, in [`Source::load`]; tests build a [`Source`] from explicit parts and
//! never touch the process environment. Errors name the bad field by its full path.

use std::{collections::HashMap, path::Path};

use serde::de::DeserializeOwned;

mod env;

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
#[derive(Clone, Default)]
pub struct Source {
    root: toml::Table,
    /// The environment's values: path, variable, text (also in `root`, as TOML).
    env: Vec<EnvOverride>,
}

#[derive(Clone)]
struct EnvOverride {
    path: Vec<String>,
    var: String,
    raw: String,
}

impl std::fmt::Debug for Source {
    /// The keys only: values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("sections", &self.root.keys().collect::<Vec<_>>())
            .field(
                "env",
                &self.env.iter().map(|o| o.var.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
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
        let mut env_values = Vec::with_capacity(overrides.len());
        for (key, value) in overrides {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(|part| part.to_ascii_lowercase())
                .collect();
            let typed =
                parse_env_value(value).unwrap_or_else(|| toml::Value::String(value.to_owned()));
            set_path(&mut root, &path, typed).map_err(|message| ConfigError::Field {
                path: path.join("."),
                message: format!("from environment variable {key}: {message}"),
            })?;
            env_values.push(EnvOverride {
                path,
                var: key.clone(),
                raw: value.clone(),
            });
        }
        Ok(Source {
            root,
            env: env_values,
        })
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
        let env: Vec<&EnvOverride> = self
            .env
            .iter()
            .filter(|o| o.path.first().is_some_and(|first| first == name))
            .collect();
        let full_path = |inner: String| {
            if inner == "." || inner.is_empty() {
                name.to_owned()
            } else {
                format!("{name}.{inner}")
            }
        };
        if env.is_empty() {
            return serde_path_to_error::deserialize(value).map_err(|error| ConfigError::Field {
                path: full_path(error.path().to_string()),
                message: error.into_inner().to_string(),
            });
        }
        let mut node = env::Node::File(value);
        for o in &env {
            node.overlay(&o.path[1..], &o.raw, parse_env_value(&o.raw));
        }
        serde_path_to_error::deserialize(node).map_err(|error| {
            let path = full_path(error.path().to_string());
            let mut message = error.into_inner().to_string();
            // The variable the bad value came from (the deepest one at or above the error).
            if let Some(o) = env
                .iter()
                .filter(|o| {
                    let dotted = o.path.join(".");
                    path == dotted
                        || path.starts_with(&format!("{dotted}."))
                        || path.starts_with(&format!("{dotted}["))
                })
                .max_by_key(|o| o.path.len())
            {
                message = format!("{message} (from environment variable {})", o.var);
            }
            ConfigError::Field { path, message }
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
        })?;
        // The value set replaces what the environment had there.
        self.env.retain(|o| !o.path.starts_with(&path));
        Ok(())
    }
}

/// What an environment value parses to as TOML, if it does.
fn parse_env_value(raw: &str) -> Option<toml::Value> {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
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

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Secrets {
        hash_secret: Option<String>,
        token: String,
        port: u16,
        enabled: bool,
        mode: Mode,
        ports: Vec<u16>,
    }

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        #[default]
        Fast,
        Slow,
    }

    fn from_env(vars: &[(&str, &str)]) -> Source {
        let env = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Source::from_parts("f.toml", Some("[svc]\nport = 1\n"), &env).unwrap()
    }

    #[test]
    fn a_string_field_takes_any_environment_value_as_it_is() {
        let source = from_env(&[
            ("SWITCHBOARD__SVC__HASH_SECRET", "1234567890123456"),
            ("SWITCHBOARD__SVC__TOKEN", "true"),
            ("SWITCHBOARD__SVC__PORT", "8080"),
            ("SWITCHBOARD__SVC__ENABLED", "true"),
            ("SWITCHBOARD__SVC__MODE", "slow"),
            ("SWITCHBOARD__SVC__PORTS", "[1, 2]"),
        ]);
        let svc: Secrets = source.section("svc").unwrap();
        assert_eq!(svc.hash_secret.as_deref(), Some("1234567890123456"));
        assert_eq!(svc.token, "true");
        assert_eq!(svc.port, 8080);
        assert!(svc.enabled);
        assert_eq!(svc.mode, Mode::Slow);
        assert_eq!(svc.ports, vec![1, 2]);
        // Floats, hex literals and dates too.
        for raw in ["1.5", "0x1f", "1979-05-27", "1e9"] {
            let source = from_env(&[("SWITCHBOARD__SVC__TOKEN", raw)]);
            assert_eq!(source.section::<Secrets>("svc").unwrap().token, raw);
        }
    }

    #[test]
    fn errors_never_echo_a_value_from_the_environment() {
        for (var, raw) in [
            ("SWITCHBOARD__SVC__PORT", "s3cr3t-v4lue"),
            ("SWITCHBOARD__SVC__PORT", "123456789012"),
            ("SWITCHBOARD__SVC__ENABLED", "98765432123"),
            ("SWITCHBOARD__SVC__MODE", "s3cr3t-v4lue"),
            ("SWITCHBOARD__SVC__PORTS", "[1, 123456789012]"),
        ] {
            let error = from_env(&[(var, raw)])
                .section::<Secrets>("svc")
                .unwrap_err()
                .to_string();
            let field = var.rsplit("__").next().unwrap().to_ascii_lowercase();
            assert!(error.contains(&format!("svc.{field}")), "{error}");
            assert!(error.contains(var), "names the variable: {error}");
            for secret in ["s3cr3t", "123456789012", "98765432123"] {
                assert!(!error.contains(secret), "{raw} echoed: {error}");
            }
        }
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let error = Source::from_parts("mesh.toml", Some("[svc\n"), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("mesh.toml"), "{error}");
    }
}
