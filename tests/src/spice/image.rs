//! Just enough image handling to tell whether a VM's screen is on an X display: binary PPM (what
//! QEMU's `screendump` writes and what ImageMagick converts screenshots to), and a search for one
//! image inside another.

use anyhow::{bail, ensure, Context as _};

/// An 8-bit RGB image.
#[derive(Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` bytes, row by row.
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for Rgb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rgb({}x{})", self.width, self.height)
    }
}

/// Largest image accepted (a 8K screen).
const MAX_PIXELS: usize = 7680 * 4320;

impl Rgb {
    /// Parses a binary PPM (`P6`, max value 255).
    pub fn from_ppm(data: &[u8]) -> anyhow::Result<Rgb> {
        let mut pos = 0;
        let mut fields = Vec::with_capacity(4);
        while fields.len() < 4 {
            // Skip whitespace and comments.
            loop {
                match data.get(pos) {
                    Some(b) if b.is_ascii_whitespace() => pos += 1,
                    Some(b'#') => {
                        while data.get(pos).is_some_and(|b| *b != b'\n') {
                            pos += 1;
                        }
                    }
                    Some(_) => break,
                    None => bail!("truncated PPM header"),
                }
            }
            let start = pos;
            while data.get(pos).is_some_and(|b| !b.is_ascii_whitespace()) {
                pos += 1;
            }
            fields.push(std::str::from_utf8(&data[start..pos]).context("PPM header")?);
        }
        ensure!(
            fields[0] == "P6",
            "not a binary PPM (magic {:?})",
            fields[0]
        );
        let width: usize = fields[1].parse().context("PPM width")?;
        let height: usize = fields[2].parse().context("PPM height")?;
        ensure!(fields[3] == "255", "PPM max value {} is not 255", fields[3]);
        ensure!(
            width > 0 && height > 0 && width.saturating_mul(height) <= MAX_PIXELS,
            "PPM size {width}x{height} out of range"
        );
        // Exactly one whitespace byte separates the header from the pixels.
        pos += 1;
        let len = width * height * 3;
        let pixels = data
            .get(pos..pos + len)
            .context("truncated PPM pixels")?
            .to_vec();
        Ok(Rgb {
            width,
            height,
            pixels,
        })
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Pixels that are not (nearly) black.
    pub fn lit_pixels(&self) -> usize {
        self.pixels
            .chunks_exact(3)
            .filter(|p| p.iter().any(|c| *c > 40))
            .count()
    }

    /// Where `needle` appears in this image at its own size (the viewer shows the guest 1:1),
    /// allowing small colour differences: the top-left corner, or `None`.
    ///
    /// A needle that is almost entirely black matches any dark area, so it is refused: the
    /// caller must wait until the guest shows something.
    pub fn find(&self, needle: &Rgb) -> anyhow::Result<Option<(usize, usize)>> {
        ensure!(
            needle.lit_pixels() >= 50,
            "the guest screen is (almost) black: nothing to look for yet"
        );
        if needle.width > self.width || needle.height > self.height {
            return Ok(None);
        }
        // Probe points: lit pixels spread over the needle, and a few dark ones, checked first so
        // that most offsets are rejected after one or two comparisons.
        let mut lit = Vec::new();
        let mut dark = Vec::new();
        for y in 0..needle.height {
            for x in 0..needle.width {
                if needle.pixel(x, y).iter().any(|c| *c > 40) {
                    lit.push((x, y));
                } else {
                    dark.push((x, y));
                }
            }
        }
        let step = (lit.len() / 64).max(1);
        let mut probes: Vec<(usize, usize)> = lit.iter().step_by(step).copied().collect();
        let dstep = (dark.len() / 16).max(1);
        probes.extend(dark.iter().step_by(dstep).copied());

        for oy in 0..=self.height - needle.height {
            for ox in 0..=self.width - needle.width {
                let probe_ok = probes
                    .iter()
                    .all(|&(x, y)| close(self.pixel(ox + x, oy + y), needle.pixel(x, y)));
                if probe_ok && self.matches_at(needle, ox, oy) {
                    return Ok(Some((ox, oy)));
                }
            }
        }
        Ok(None)
    }

    /// At least 99% of the needle's pixels are close to the image's at this offset.
    fn matches_at(&self, needle: &Rgb, ox: usize, oy: usize) -> bool {
        let total = needle.width * needle.height;
        let allowed_misses = total / 100;
        let mut misses = 0;
        for y in 0..needle.height {
            for x in 0..needle.width {
                if !close(self.pixel(ox + x, oy + y), needle.pixel(x, y)) {
                    misses += 1;
                    if misses > allowed_misses {
                        return false;
                    }
                }
            }
        }
        true
    }
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(width: usize, height: usize, pixels: &[u8]) -> Vec<u8> {
        let mut out = format!("P6\n# a comment\n{width} {height}\n255\n").into_bytes();
        out.extend_from_slice(pixels);
        out
    }

    /// A black image with a grey "text" pattern.
    fn pattern(width: usize, height: usize, seed: usize) -> Rgb {
        let mut pixels = vec![0u8; width * height * 3];
        for y in 0..height {
            for x in 0..width {
                if (x * 7 + y * 13 + seed) % 5 == 0 && y % 4 != 0 {
                    let i = (y * width + x) * 3;
                    pixels[i..i + 3].copy_from_slice(&[0xaa, 0xaa, 0xaa]);
                }
            }
        }
        Rgb {
            width,
            height,
            pixels,
        }
    }

    fn paste(dst: &mut Rgb, src: &Rgb, ox: usize, oy: usize) {
        for y in 0..src.height {
            for x in 0..src.width {
                let d = ((oy + y) * dst.width + ox + x) * 3;
                let s = (y * src.width + x) * 3;
                dst.pixels[d..d + 3].copy_from_slice(&src.pixels[s..s + 3]);
            }
        }
    }

    #[test]
    fn parses_ppm_and_refuses_garbage() {
        let img = Rgb::from_ppm(&ppm(2, 1, &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!((img.width, img.height), (2, 1));
        assert_eq!(img.pixel(1, 0), [4, 5, 6]);
        for bad in [
            &b""[..],
            b"P5\n1 1\n255\n\0",
            b"P6\n1 1\n65535\n\0\0\0\0\0\0",
            b"P6\n2 2\n255\n\0\0\0",
            b"P6\n0 1\n255\n",
            b"P6\n99999 99999\n255\n",
            b"P6\nx 1\n255\n\0\0\0",
        ] {
            assert!(
                Rgb::from_ppm(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn finds_a_screen_inside_a_screenshot_and_not_a_different_one() {
        let guest = pattern(72, 40, 0);
        let mut shot = Rgb {
            width: 200,
            height: 120,
            pixels: vec![0xee; 200 * 120 * 3],
        };
        paste(&mut shot, &guest, 5, 51);
        assert_eq!(shot.find(&guest).unwrap(), Some((5, 51)));

        // Slightly different colours (lossless codecs aside, a viewer may dither) still match.
        let mut tinted = shot.clone();
        for p in &mut tinted.pixels {
            *p = p.saturating_add(10);
        }
        assert_eq!(tinted.find(&guest).unwrap(), Some((5, 51)));

        // Another screen, or the same screen cut off, is not found.
        assert_eq!(shot.find(&pattern(72, 40, 1)).unwrap(), None);
        let mut cut = shot.clone();
        paste(&mut cut, &pattern(30, 40, 3), 5, 51);
        assert_eq!(cut.find(&guest).unwrap(), None);
        // A needle larger than the image is simply absent.
        assert_eq!(guest.find(&shot).unwrap(), None);
    }

    #[test]
    fn a_black_guest_screen_is_not_searched_for() {
        let black = Rgb {
            width: 10,
            height: 10,
            pixels: vec![0; 300],
        };
        let shot = Rgb {
            width: 20,
            height: 20,
            pixels: vec![0; 1200],
        };
        assert!(shot.find(&black).is_err());
    }
}
