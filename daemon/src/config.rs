//! `--config FILE`: a TOML file with one table per subcommand whose keys are the long flag
//! names. Flags on the command line win: a key is used only when its flag is absent.
//!
//! ```toml
//! [export]
//! image = ["vda=/var/lib/vms/web.img"]
//! nbd = "unix:/run/tern/web.nbd"
//! control = "/run/tern/web.ctl"
//! identity = "/etc/tern/id"
//! metrics = "127.0.0.1:9187"
//!
//! [serve]
//! listen = "0.0.0.0:4433"
//! ```

use std::ffi::OsString;

use anyhow::{Context, bail};

/// Returns `argv` with the config file's settings for the chosen subcommand spliced in
/// after the subcommand's name (so clap parses them as that subcommand's flags).
pub(crate) fn apply(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(position) = argv.iter().position(|a| a == "--config") else {
        if let Some(arg) = argv
            .iter()
            .find(|a| a.to_string_lossy().starts_with("--config="))
        {
            let path = arg.to_string_lossy()["--config=".len()..].to_owned();
            let mut rest: Vec<OsString> = argv.iter().filter(|a| *a != arg).cloned().collect();
            rest.insert(1, "--config".into());
            rest.insert(2, path.into());
            return apply(rest);
        }
        return Ok(argv);
    };
    let Some(path) = argv.get(position + 1).cloned() else {
        bail!("--config needs a file");
    };
    let mut argv = argv;
    argv.drain(position..=position + 1);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read config {}", path.to_string_lossy()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parse config {}", path.to_string_lossy()))?;
    // The subcommand is the first argument that is a table in the file.
    let Some((index, section)) = argv
        .iter()
        .enumerate()
        .skip(1)
        .find_map(|(i, a)| table.get(a.to_str()?).map(|section| (i, section)))
    else {
        return Ok(argv);
    };
    let Some(section) = section.as_table() else {
        bail!(
            "config: [{}] must be a table",
            argv[index].to_string_lossy()
        );
    };
    let mut injected = Vec::new();
    for (key, value) in section {
        let flag = format!("--{key}");
        let given = argv.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        if given {
            continue;
        }
        match value {
            toml::Value::Boolean(true) => injected.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    injected.push(OsString::from(&flag));
                    injected.push(scalar(key, item)?.into());
                }
            }
            other => {
                injected.push(OsString::from(&flag));
                injected.push(scalar(key, other)?.into());
            }
        }
    }
    argv.splice(index + 1..index + 1, injected);
    Ok(argv)
}

fn scalar(key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!("config: {key} = {other} is not a flag value"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_fill_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.toml");
        std::fs::write(
            &path,
            "[export]\nimage = [\"a=/x\", \"b=/y\"]\nnbd = \"unix:/n\"\ncontrol = \"/c\"\nmax-migrations = 2\n",
        )
        .unwrap();
        let argv: Vec<OsString> = [
            "tern",
            "--config",
            path.to_str().unwrap(),
            "export",
            "--nbd",
            "127.0.0.1:1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out: Vec<String> = apply(argv)
            .unwrap()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            out,
            [
                "tern",
                "export",
                "--control",
                "/c",
                "--image",
                "a=/x",
                "--image",
                "b=/y",
                "--max-migrations",
                "2",
                "--nbd",
                "127.0.0.1:1"
            ]
        );
    }
}
