"""A WebRTC caller on GStreamer's webrtcbin: an independent stack (libnice ICE, OpenSSL
DTLS with an RSA certificate), for tests/e2e/test_gst_webrtc.py.

Run it with Debian's /usr/bin/python3 (python3-gi, GStreamer 1.22), not the project's
virtualenv. It posts its offer to the agent's /offer (it gathers ICE fully first, as the
web client does), says the question in a 16 kHz mono WAV once connected, keeps sending
silence, and listens. It prints one JSON object: the connection states seen, frames
heard, loud frames after the question, the "events" data channel's messages, any error.

    /usr/bin/python3 webrtcbin_caller.py http://127.0.0.1:PORT question.wav [--seconds S] [--record heard.wav]
    /usr/bin/python3 webrtcbin_caller.py --probe   # exit 0 when every element is there
"""

import argparse
import audioop
import json
import sys
import threading
import time
import urllib.request
import wave

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

RATE = 16000
FRAME = 320  # samples in 20 ms
LOUD = 300  # RMS above which a frame heard counts as the agent speaking
ELEMENTS = ("webrtcbin", "nicesrc", "dtlssrtpenc", "sctpenc", "opusenc", "opusdec", "rtpopuspay",
            "rtpopusdepay", "appsrc", "appsink", "audioconvert", "audioresample")
SEND = ("webrtcbin name=webrtc bundle-policy=max-bundle "
        "appsrc name=mic is-live=true format=time "
        f"caps=audio/x-raw,format=S16LE,rate={RATE},channels=1,layout=interleaved "
        "! audioconvert ! audioresample ! opusenc ! rtpopuspay pt=111 "
        "! application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload=111 ! webrtc.")
RECEIVE = ("rtpopusdepay ! opusdec ! audioconvert ! audioresample "
           f"! audio/x-raw,format=S16LE,rate={RATE},channels=1 ! appsink name=ear emit-signals=true sync=false")


class WebrtcbinCaller:
    def __init__(self, base_url: str, speech: bytes, seconds: float, record: str | None) -> None:
        self.base_url = base_url
        self.speech = speech
        self.loop = GLib.MainLoop()
        self.pipe = Gst.parse_launch(SEND)
        self.webrtc = self.pipe.get_by_name("webrtc")
        self.mic = self.pipe.get_by_name("mic")
        self.report: dict = {"states": [], "ice_states": [], "frames_heard": 0, "loud_after_speech": 0,
                             "reply_after_s": None, "messages": [], "error": None}
        self.channel = None
        self.offer_tries = 0
        self.sent = 0  # 20 ms frames pushed
        self.t0 = 0.0
        self.speak_from: int | None = None  # frame index where the question starts
        self.speech_end: float | None = None  # wall time the question's last frame went out
        self.heard = b""
        self.record = wave.open(record, "wb") if record else None
        if self.record:
            self.record.setnchannels(1), self.record.setsampwidth(2), self.record.setframerate(RATE)
        self.webrtc.connect("on-negotiation-needed", self.on_negotiation_needed)
        self.webrtc.connect("notify::ice-gathering-state", self.on_gathering)
        self.webrtc.connect("notify::connection-state", self.on_connection_state)
        self.webrtc.connect("notify::ice-connection-state", self.on_ice_state)
        self.webrtc.connect("pad-added", self.on_pad)
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self.on_error)
        GLib.timeout_add(int(seconds * 1000), self.finish)

    def run(self) -> dict:
        self.pipe.set_state(Gst.State.PLAYING)
        self.t0 = time.monotonic()
        GLib.timeout_add(10, self.feed)
        self.loop.run()
        self.pipe.set_state(Gst.State.NULL)
        if self.record:
            self.record.close()
        return self.report

    def finish(self) -> bool:
        self.loop.quit()
        return False

    # -- signaling ---------------------------------------------------------------

    def on_negotiation_needed(self, webrtc) -> None:
        self.channel = webrtc.emit("create-data-channel", "events", None)
        if self.channel is not None:
            self.channel.connect("on-message-string", lambda ch, text: self.report["messages"].append(json.loads(text)))
        self.create_offer()

    def create_offer(self) -> bool:
        self.webrtc.emit("create-offer", None, Gst.Promise.new_with_change_func(self.on_offer, None))
        return False

    def on_offer(self, promise, _data) -> None:
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None and reply.has_field("offer") else None
        if offer is None:  # webrtcbin can be asked before the sending pad's caps are known: ask again
            self.offer_tries += 1
            if self.offer_tries > 20:
                GLib.idle_add(self.fail, f"create-offer failed: {reply.to_string() if reply is not None else 'no reply'}")
            else:
                GLib.timeout_add(100, self.create_offer)
            return
        self.webrtc.emit("set-local-description", offer, Gst.Promise.new())

    def on_gathering(self, webrtc, _pspec) -> None:
        if webrtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            sdp = webrtc.get_property("local-description").sdp.as_text()
            threading.Thread(target=self.post_offer, args=(sdp,), daemon=True).start()

    def post_offer(self, sdp: str) -> None:
        request = urllib.request.Request(self.base_url + "/offer", method="POST",
                                         data=json.dumps({"sdp": sdp, "type": "offer"}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            GLib.idle_add(self.fail, f"offer refused: {e}")
            return
        GLib.idle_add(self.set_answer, answer["sdp"])

    def set_answer(self, text: str) -> bool:
        _, message = GstSdp.SDPMessage.new_from_text(text)
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())
        return False

    def on_connection_state(self, webrtc, _pspec) -> None:
        state = webrtc.get_property("connection-state").value_nick
        self.report["states"].append(state)
        if state == "connected" and self.speak_from is None:
            self.speak_from = self.sent + 25  # half a second of silence first
        if state in ("failed", "closed"):
            self.fail(f"connection {state}")

    def on_ice_state(self, webrtc, _pspec) -> None:
        self.report["ice_states"].append(webrtc.get_property("ice-connection-state").value_nick)

    def on_error(self, _bus, message) -> None:
        error, debug = message.parse_error()
        self.fail(f"{error.message} ({debug})")

    def fail(self, reason: str) -> bool:
        self.report["error"] = self.report["error"] or reason
        self.loop.quit()
        return False

    # -- media -------------------------------------------------------------------

    def feed(self) -> bool:
        """Push every 20 ms frame due by the wall clock: the question once connected, else silence."""
        due = int((time.monotonic() - self.t0) / 0.02) + 1
        while self.sent < due:
            chunk = b""
            if self.speak_from is not None and self.sent >= self.speak_from:
                start = (self.sent - self.speak_from) * FRAME * 2
                chunk = self.speech[start:start + FRAME * 2]
                if chunk and start + FRAME * 2 >= len(self.speech):
                    self.speech_end = time.monotonic()
            buffer = Gst.Buffer.new_wrapped(chunk.ljust(FRAME * 2, b"\0"))
            buffer.pts = self.sent * 20 * Gst.MSECOND
            buffer.duration = 20 * Gst.MSECOND
            self.mic.emit("push-buffer", buffer)
            self.sent += 1
        return True

    def on_pad(self, webrtc, pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        ear = Gst.parse_bin_from_description(RECEIVE, True)
        self.pipe.add(ear)
        ear.sync_state_with_parent()
        pad.link(ear.get_static_pad("sink"))
        ear.get_by_name("ear").connect("new-sample", self.on_sample)

    def on_sample(self, sink) -> Gst.FlowReturn:
        buffer = sink.emit("pull-sample").get_buffer()
        ok, info = buffer.map(Gst.MapFlags.READ)
        if ok:
            self.heard += bytes(info.data)
            buffer.unmap(info)
        while len(self.heard) >= FRAME * 2:
            frame, self.heard = self.heard[:FRAME * 2], self.heard[FRAME * 2:]
            if self.record:
                self.record.writeframes(frame)
            self.report["frames_heard"] += 1
            if self.speech_end is not None and audioop.rms(frame, 2) > LOUD:
                self.report["loud_after_speech"] += 1
                if self.report["reply_after_s"] is None:
                    self.report["reply_after_s"] = round(time.monotonic() - self.speech_end, 3)
        if self.report["loud_after_speech"] >= 25 and any(m.get("type") == "turn" for m in self.report["messages"]):
            GLib.idle_add(self.finish)  # the question was answered aloud, and the turn reported
        return Gst.FlowReturn.OK


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url", nargs="?")
    parser.add_argument("wav", nargs="?")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--record")
    parser.add_argument("--probe", action="store_true")
    args = parser.parse_args()
    Gst.init(None)
    missing = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    if args.probe:
        print(f"GStreamer {Gst.version_string()}; missing elements: {' '.join(missing) or 'none'}")
        return 1 if missing else 0
    with wave.open(args.wav) as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, RATE):
            raise SystemExit(f"{args.wav}: want 16 kHz mono 16-bit")
        speech = w.readframes(w.getnframes())
    print(json.dumps(WebrtcbinCaller(args.url, speech, args.seconds, args.record).run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
