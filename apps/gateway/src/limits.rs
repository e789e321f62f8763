//! The limits of one connection (frame size, frames per second, subscriptions) and the
//! WebSocket close codes the gateway ends a connection with.
//!
//! Owns the counting and the codes. Must not touch sockets (`socket` closes) nor frames.

use std::time::{Duration, Instant};

/// Close codes, one per reason a gateway ends a connection.
///
/// It exists so that a client can tell from the code alone what to change.
pub struct CloseCode;

impl CloseCode {
    /// The node stops (RFC 6455 "going away"); reconnect, possibly to another node.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame larger than `max_frame_bytes`, or a binary frame (RFC 6455 1009 / 1003).
    pub const TOO_BIG: u16 = 1009;
    /// A binary frame: the protocol is JSON text.
    pub const UNSUPPORTED: u16 = 1003;
    /// The client's own queue could not be set up (no broker); reconnect later.
    pub const UNAVAILABLE: u16 = 1011;
    /// More than `max_frames_per_sec` frames in one second.
    pub const TOO_MANY_FRAMES: u16 = 4029;
    /// More than `max_subscriptions` subscriptions on one connection.
    pub const TOO_MANY_SUBSCRIPTIONS: u16 = 4030;
    /// A newer connection of the same identity took over on this node.
    pub const REPLACED: u16 = 4409;
}

/// Frames per one-second window: the window's start and its count.
///
/// It exists so that a client sending faster than `max_frames_per_sec` is closed instead
/// of queueing work without bound.
pub struct FrameRate {
    max: u32,
    window: Instant,
    count: u32,
}

impl FrameRate {
    pub fn new(max: u32) -> FrameRate {
        FrameRate {
            max,
            window: Instant::now(),
            count: 0,
        }
    }

    /// Counts one frame at `now`; `false` once the window holds more than the limit.
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_resets_each_second() {
        let start = Instant::now();
        let mut rate = FrameRate::new(2);
        assert!(rate.allow(start));
        assert!(rate.allow(start));
        assert!(!rate.allow(start + Duration::from_millis(10)));
        assert!(rate.allow(start + Duration::from_millis(1001)));
    }
}
