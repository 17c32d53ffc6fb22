//! `kilnc targets`: the device descriptors kiln ships (`targets/descriptors/*.toml`).

use kiln_targets::{Backend, Target};

/// List the devices kiln compiles for: triple, assumed CPU features, backend and execution
/// providers, memory budget and defaults.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the descriptors as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let targets = kiln_targets::all()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&targets)?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = targets.iter().map(row).collect();
    let header = [
        "target", "triple", "assumes", "backend", "budget", "defaults",
    ]
    .map(String::from);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

/// One line of the table.
fn row(t: &Target) -> [String; 6] {
    let assumes = if t.cpu.assume.is_empty() {
        "-".to_owned()
    } else {
        t.cpu.assume.join(",")
    };
    let backend = match t.backend {
        Backend::Native => "native".to_owned(),
        Backend::Ort => {
            let eps: Vec<&str> = t
                .execution_providers
                .iter()
                .map(|ep| ep.display_name())
                .collect();
            format!("ort ({})", eps.join(" > "))
        }
    };
    let budget = t.memory.budget.map_or_else(|| "unlimited".to_owned(), gib);
    let threads = match t.defaults.threads {
        0 => "all cores".to_owned(),
        n => format!("{n} threads"),
    };
    let defaults = format!(
        "{}, ctx {}, {threads}",
        t.defaults.quant, t.defaults.context
    );
    [
        t.name.clone(),
        t.triple.clone(),
        assumes,
        backend,
        budget,
        defaults,
    ]
}

/// `3221225472` → `3 GiB`.
fn gib(bytes: u64) -> String {
    format!(
        "{} GiB",
        (bytes as f64 / f64::from(1u32 << 30) * 10.0).round() / 10.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::quant::Format;

    #[test]
    fn every_descriptor_has_a_row() {
        let targets = kiln_targets::all().expect("descriptors");
        let rpi5 = targets.iter().find(|t| t.name == "rpi5").expect("rpi5");
        let r = row(rpi5);
        assert_eq!(r[2], "neon,dotprod,fp16");
        assert_eq!(r[3], "native");
        assert_eq!(r[4], "6 GiB");
        let orin = targets
            .iter()
            .find(|t| t.name == "jetson-orin-nano")
            .expect("orin");
        assert_eq!(row(orin)[3], "ort (CUDA > TensorRT > CPU)");
        let host = targets.iter().find(|t| t.name == "host").expect("host");
        assert_eq!(row(host)[4], "unlimited");
    }

    /// The names descriptors may use are the ones the runtime understands.
    #[test]
    fn descriptor_names_agree_with_the_runtime() {
        for feature in kiln_targets::features_for_arch(std::env::consts::ARCH).unwrap_or(&[]) {
            assert!(
                kiln_runtime::cpu::knows_feature(feature),
                "the runtime cannot check {feature}"
            );
        }
        for quant in kiln_targets::QUANTS {
            assert!(Format::from_name(quant).is_some(), "{quant}");
        }
        assert_eq!(kiln_targets::QUANTS.len(), Format::QUANTIZABLE.len());
    }
}
