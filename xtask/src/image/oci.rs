//! OCI image archives, written here rather than by a container tool: a layer
//! tar of the image's few files, its config, manifest and index, in the OCI
//! image layout, as one tar that `ctr images import` (and podman/skopeo's
//! `oci-archive:`) reads.
//!
//! Why not a Containerfile and Debian's buildah (1.28, tried first): it builds
//! `FROM scratch` + `COPY` images fine with private `--root`/`--runroot`, but as
//! root it always writes its blob-info cache to `/var/lib/containers/cache`,
//! which no flag moves, so a build would change the machine. Written here, an
//! image needs no tool and no daemon, and it is reproducible: no timestamps,
//! files owned by root with fixed modes, so the same binaries give the same
//! digests (and a second import is a no-op).

use std::io::Write;

use anyhow::{Context, Result};
use flate2::{write::GzEncoder, Compression};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder, RootFsBuilder,
    Sha256Digest, ANNOTATION_REF_NAME,
};
use sha2::{Digest as _, Sha256};

/// A regular file of the image, owned by root.
pub struct File {
    /// Its path in the image, relative to `/`.
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// What goes into one image: its files in one layer, and how it runs.
pub struct Image {
    /// Full references (`registry/name:tag`), each one entry of the index.
    pub names: Vec<String>,
    pub files: Vec<File>,
    pub entrypoint: Vec<String>,
    /// Default arguments (a Pod's `args` replace them).
    pub cmd: Vec<String>,
}

/// A blob of the layout: its bytes and their descriptor.
struct Blob {
    bytes: Vec<u8>,
    descriptor: Descriptor,
}

impl Blob {
    fn new(media_type: MediaType, bytes: Vec<u8>) -> Result<Self> {
        let digest = sha256(&bytes)?;
        let descriptor = Descriptor::new(media_type, bytes.len() as u64, digest);
        Ok(Self { bytes, descriptor })
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", self.descriptor.digest().digest())
    }
}

fn sha256(bytes: &[u8]) -> Result<Sha256Digest> {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex.parse().context("a sha256 digest")
}

/// A tar entry owned by root, without a timestamp.
fn append(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, bytes: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    tar.append_data(&mut header, path, bytes)
        .with_context(|| format!("adding {path} to a tar"))
}

/// The layer, gzipped, and its uncompressed digest (the config's diff id).
fn layer(files: &[File]) -> Result<(Blob, Sha256Digest)> {
    let mut tar = tar::Builder::new(Vec::new());
    for file in files {
        append(&mut tar, &file.path, file.mode, &file.contents)?;
    }
    let tar = tar.into_inner()?;
    let diff_id = sha256(&tar)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar)?;
    let blob = Blob::new(MediaType::ImageLayerGzip, gz.finish()?)?;
    Ok((blob, diff_id))
}

/// The image's config. Nothing in it is a map of more than one entry:
/// oci-spec writes maps (`ExposedPorts`, `Labels`) from a `HashMap`, whose order
/// would change the config's bytes, so its digest, from one build to the next.
fn config(image: &Image, diff_id: &Sha256Digest) -> Result<Blob> {
    let mut run = ConfigBuilder::default().entrypoint(image.entrypoint.clone());
    if !image.cmd.is_empty() {
        run = run.cmd(image.cmd.clone());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(run.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()?,
        )
        .build()?;
    Blob::new(MediaType::ImageConfig, config.to_string()?.into_bytes())
}

/// The whole archive of `image`, in memory.
pub fn archive(image: &Image) -> Result<Vec<u8>> {
    let (layer, diff_id) = layer(&image.files)?;
    let config = config(image, &diff_id)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor.clone())
        .layers(vec![layer.descriptor.clone()])
        .build()?;
    let manifest = Blob::new(MediaType::ImageManifest, manifest.to_string()?.into_bytes())?;
    let platform = PlatformBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .build()?;
    let entries = image
        .names
        .iter()
        .map(|name| {
            let mut entry = manifest.descriptor.clone();
            entry.set_platform(Some(platform.clone()));
            // The full reference, as buildah writes it: containerd keeps a
            // full one as the image's name (a bare tag would get a prefix).
            entry.set_annotations(Some(
                [(ANNOTATION_REF_NAME.to_string(), name.clone())].into(),
            ));
            entry
        })
        .collect::<Vec<_>>();
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(entries)
        .build()?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;

    let mut tar = tar::Builder::new(Vec::new());
    append(
        &mut tar,
        "oci-layout",
        0o644,
        serde_json::to_string(&layout)?.as_bytes(),
    )?;
    append(&mut tar, "index.json", 0o644, index.to_string()?.as_bytes())?;
    for blob in [&config, &manifest, &layer] {
        append(&mut tar, &blob.path(), 0o644, &blob.bytes)?;
    }
    Ok(tar.into_inner()?)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read};

    use flate2::read::GzDecoder;
    use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

    use super::*;

    fn image() -> Image {
        Image {
            names: vec!["ferry.local/test:1".into(), "ferry.local/test:lab".into()],
            files: vec![File {
                path: "bin-x".into(),
                mode: 0o755,
                contents: b"\x7fELF not really".to_vec(),
            }],
            entrypoint: vec!["/bin-x".into(), "serve".into()],
            cmd: vec!["--flag".into()],
        }
    }

    /// The files of a tar, by path.
    fn entries(tar: &[u8]) -> BTreeMap<String, (u32, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mode = entry.header().mode().unwrap();
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                (path, (mode, bytes))
            })
            .collect()
    }

    /// A blob by its descriptor, checked against the descriptor's digest and size.
    fn blob<'a>(files: &'a BTreeMap<String, (u32, Vec<u8>)>, d: &Descriptor) -> &'a [u8] {
        let hex = d.digest().digest();
        let (_, bytes) = &files[&format!("blobs/sha256/{hex}")];
        assert_eq!(sha256(bytes).unwrap().digest(), hex, "blob digest");
        assert_eq!(bytes.len() as u64, d.size(), "blob size");
        bytes
    }

    #[test]
    fn the_archive_is_an_oci_layout_whose_digests_hold() {
        let files = entries(&archive(&image()).unwrap());
        assert_eq!(files["oci-layout"].1, br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index = ImageIndex::from_reader(&files["index.json"].1[..]).unwrap();
        let names: Vec<&str> = index
            .manifests()
            .iter()
            .map(|m| m.annotations().as_ref().unwrap()[ANNOTATION_REF_NAME].as_str())
            .collect();
        assert_eq!(names, ["ferry.local/test:1", "ferry.local/test:lab"]);
        assert_eq!(index.manifests()[0].digest(), index.manifests()[1].digest());
        let platform = index.manifests()[0].platform().clone().unwrap();
        assert_eq!(
            (platform.architecture(), platform.os()),
            (&Arch::Amd64, &Os::Linux)
        );

        let manifest = ImageManifest::from_reader(blob(&files, &index.manifests()[0])).unwrap();
        let config = ImageConfiguration::from_reader(blob(&files, manifest.config())).unwrap();
        let run = config.config().clone().unwrap();
        assert_eq!(run.entrypoint().clone().unwrap(), ["/bin-x", "serve"]);
        assert_eq!(run.cmd().clone().unwrap(), ["--flag"]);

        let [layer] = manifest.layers().as_slice() else {
            panic!("one layer expected");
        };
        assert_eq!(layer.media_type(), &MediaType::ImageLayerGzip);
        let mut tar = Vec::new();
        GzDecoder::new(blob(&files, layer))
            .read_to_end(&mut tar)
            .unwrap();
        let diff_id = format!("sha256:{}", sha256(&tar).unwrap());
        assert_eq!(config.rootfs().diff_ids(), &[diff_id]);
        let layer_files = entries(&tar);
        assert_eq!(
            layer_files.into_iter().collect::<Vec<_>>(),
            [("bin-x".to_string(), (0o755, b"\x7fELF not really".to_vec()))]
        );
    }

    #[test]
    fn the_same_image_gives_the_same_bytes() {
        assert_eq!(archive(&image()).unwrap(), archive(&image()).unwrap());
    }
}
