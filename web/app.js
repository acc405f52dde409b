// Voice Agent web client: plain JavaScript, standard WebRTC / WebAudio APIs only.
//
// Signaling (see signaling/server.py):
//   GET  /health            -> {status, models, active_calls, max_calls, voices, default_voice}
//   POST /offer             {sdp, type: "offer", voice?} -> {sdp, type: "answer", call_id}
//   DELETE /calls/<call_id> hangs up.
// One data channel, "events", carries the agent's JSON events to the page.
//
// For tests and debugging: window.voiceAgent = {pc, callId, state, events}, with state
// one of "idle", "connecting", "in-call", "ended", "error".

(() => {
  "use strict";

  const MIC_CONSTRAINTS = {
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    video: false,
  };
  const ICE_GATHER_TIMEOUT_MS = 5000;
  const CONNECT_TIMEOUT_MS = 20000;
  const DISCONNECT_GRACE_MS = 6000;
  const MAX_EVENTS_KEPT = 200;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    statusText: $("status-text"),
    button: $("call"),
    buttonLabel: $("call-label"),
    voice: $("voice"),
    micLevel: $("mic-level"),
    micMeter: $("mic-meter"),
    orb: $("orb"),
    activity: $("agent-activity"),
    timer: $("timer"),
    transcript: $("transcript"),
    clear: $("clear"),
    latencyValue: $("latency-value"),
    latencyMedian: $("latency-median"),
    breakdown: $("latency-breakdown"),
    audio: $("remote-audio"),
  };

  const voiceAgent = { pc: null, callId: null, state: "idle", events: [], call: startCall, hangUp };
  window.voiceAgent = voiceAgent;

  let health = null; // last /health answer, null when unreachable
  let healthTimer = null;
  let stickyStatus = false; // a call's outcome stays on the status line until the next action
  let call = null; // the current call's resources

  // ---------------------------------------------------------------- state and status

  function setState(state) {
    voiceAgent.state = state;
    document.body.dataset.state = state;
    renderControls();
  }

  function setStatus(text, kind = "info") {
    ui.statusText.textContent = text;
    ui.status.dataset.kind = kind;
  }

  function inCall() {
    return voiceAgent.state === "connecting" || voiceAgent.state === "in-call";
  }

  function renderControls() {
    const state = voiceAgent.state;
    const b = ui.button;
    if (state === "connecting") {
      b.dataset.mode = "connecting";
      ui.buttonLabel.textContent = "Cancel";
      b.setAttribute("aria-label", "Cancel call");
      b.disabled = false;
    } else if (state === "in-call") {
      b.dataset.mode = "hangup";
      ui.buttonLabel.textContent = "Hang up";
      b.setAttribute("aria-label", "Hang up call");
      b.disabled = false;
    } else {
      b.dataset.mode = "call";
      ui.buttonLabel.textContent = "Call";
      b.removeAttribute("aria-label");
      b.disabled = Boolean(health && health.status === "loading");
    }
    ui.voice.disabled = inCall() || ui.voice.options.length === 0 || !health;
    ui.orb.dataset.live = String(state === "in-call");
    renderActivity();
  }

  // ---------------------------------------------------------------- health

  function scheduleHealth(ms) {
    clearTimeout(healthTimer);
    healthTimer = setTimeout(checkHealth, ms);
  }

  async function checkHealth() {
    clearTimeout(healthTimer);
    let answer = null;
    try {
      const resp = await fetch("/health", { cache: "no-store" });
      answer = await readJson(resp);
      if (!answer || typeof answer !== "object" || !answer.status) {
        throw new Error(`HTTP ${resp.status}`);
      }
    } catch (err) {
      health = null;
      if (!inCall()) {
        stickyStatus = false;
        setState("error");
        setStatus("Can't reach the voice agent server. Retrying…", "error");
      }
      scheduleHealth(3000);
      return;
    }
    const wasUnreachable = health === null;
    health = answer;
    fillVoices(answer);
    if (!inCall()) {
      if (wasUnreachable && voiceAgent.state === "error" && !stickyStatus) setState("idle");
      showIdleStatus();
    }
    renderControls();
    scheduleHealth(answer.status === "ready" ? 10000 : 1500);
  }

  function showIdleStatus() {
    if (stickyStatus || !health) return;
    if (health.status !== "ready") {
      setStatus("Loading models… the agent will be ready shortly", "busy");
    } else if (health.max_calls && health.active_calls >= health.max_calls) {
      setStatus(`All lines are busy (${health.active_calls} of ${health.max_calls} calls)`, "busy");
    } else {
      setStatus("Ready — press Call to talk to the agent", "ready");
    }
  }

  function fillVoices(h) {
    const voices = Array.isArray(h.voices) ? h.voices.filter((v) => typeof v === "string") : [];
    const current = [...ui.voice.options].map((o) => o.value);
    if (voices.length === 0 || sameList(voices, current)) return;
    const wanted = ui.voice.dataset.chosen || savedVoice() || h.default_voice || voices[0];
    ui.voice.replaceChildren(
      ...voices.map((v) => {
        const opt = document.createElement("option");
        opt.value = v;
        opt.textContent = v.charAt(0).toUpperCase() + v.slice(1);
        return opt;
      }),
    );
    ui.voice.value = voices.includes(wanted) ? wanted : (voices.includes(h.default_voice) ? h.default_voice : voices[0]);
  }

  function sameList(a, b) {
    return a.length === b.length && a.every((x, i) => x === b[i]);
  }

  function savedVoice() {
    try {
      return localStorage.getItem("voice-agent.voice");
    } catch {
      return null;
    }
  }

  ui.voice.addEventListener("change", () => {
    ui.voice.dataset.chosen = ui.voice.value;
    try {
      localStorage.setItem("voice-agent.voice", ui.voice.value);
    } catch {
      /* storage unavailable: fine */
    }
  });

  // ---------------------------------------------------------------- calling

  ui.button.addEventListener("click", () => {
    if (inCall()) hangUp();
    else startCall();
  });

  async function startCall() {
    if (call) return;
    const c = {
      ended: false,
      pc: null,
      dc: null,
      stream: null,
      callId: null,
      audioCtx: null,
      micAnalyser: null,
      remoteAnalyser: null,
      raf: 0,
      timers: {},
      startedAt: 0,
      turns: new Map(),
      callerLive: null,
      callerUnanswered: [], // caller lines since the agent's last reply began (their turn is not known yet)
      latencies: [],
      speakingUntil: 0,
    };
    call = c;
    stickyStatus = false;
    voiceAgent.callId = null;
    voiceAgent.events = [];
    setState("connecting");
    setStatus("Waiting for the microphone…", "busy");

    // Created inside the click so that browsers let it run (autoplay policy).
    try {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      if (Ctx) c.audioCtx = new Ctx();
    } catch {
      c.audioCtx = null;
    }

    try {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new CallError("This page needs a secure origin (https or localhost) to use the microphone.");
      }
      try {
        c.stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
      } catch (err) {
        throw new CallError(describeMicError(err));
      }
      if (c.ended) {
        for (const track of c.stream.getTracks()) track.stop(); // cancelled meanwhile
        return;
      }
      startMeters(c);

      setStatus("Connecting…", "busy");
      const pc = new RTCPeerConnection();
      c.pc = pc;
      voiceAgent.pc = pc;

      c.dc = pc.createDataChannel("events");
      c.dc.onmessage = (e) => onEvent(c, e.data);
      c.dc.onclose = () => {
        if (!c.ended && voiceAgent.state === "in-call" && call === c) {
          endCall(c, { note: "The agent ended the call" });
        }
      };

      for (const track of c.stream.getAudioTracks()) pc.addTrack(track, c.stream);
      pc.ontrack = (e) => onRemoteTrack(c, e);
      pc.onconnectionstatechange = () => onConnectionState(c);
      pc.oniceconnectionstatechange = () => onConnectionState(c);

      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringComplete(pc, ICE_GATHER_TIMEOUT_MS);
      if (c.ended) return;

      const offer = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
      if (ui.voice.value) offer.voice = ui.voice.value;
      let resp;
      try {
        resp = await fetch("/offer", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(offer),
        });
      } catch {
        throw new CallError("Can't reach the voice agent server.");
      }
      const answer = await readJson(resp);
      if (!resp.ok) throw new CallError(describeHttpError(resp.status, answer));
      if (!answer || typeof answer.sdp !== "string") {
        throw new CallError("The server sent an invalid answer.");
      }
      c.callId = answer.call_id || null;
      voiceAgent.callId = c.callId;
      if (c.ended) return sendHangUp(c.callId);

      await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
      setStatus("Connecting audio…", "busy");
      c.timers.connect = setTimeout(
        () => endCall(c, { error: "Couldn't connect the audio (timed out). Check your network or firewall." }),
        CONNECT_TIMEOUT_MS,
      );
      onConnectionState(c);
    } catch (err) {
      const message = err instanceof CallError ? err.message : `Call failed: ${err && err.message ? err.message : err}`;
      endCall(c, { error: message });
    }
  }

  class CallError extends Error {}

  function describeMicError(err) {
    switch (err && err.name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Microphone access was blocked. Allow it for this page and try again.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No microphone was found.";
      case "NotReadableError":
        return "The microphone is in use by another application.";
      default:
        return `Couldn't open the microphone${err && err.message ? `: ${err.message}` : "."}`;
    }
  }

  function describeHttpError(status, body) {
    const reason = body && typeof body.error === "string" ? body.error.trim().replace(/[.\s]+$/, "") : "";
    if (status === 503) {
      return `Couldn't start the call: ${reason || "the agent is busy"}. Please try again shortly.`;
    }
    return `Couldn't start the call: ${reason || "the server refused it"} (HTTP ${status}).`;
  }

  async function readJson(resp) {
    try {
      return await resp.json();
    } catch {
      return null;
    }
  }

  function iceGatheringComplete(pc, timeoutMs) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => {
        if (pc.iceGatheringState === "complete") done();
      };
      // Send what has been gathered if gathering stalls (e.g. an unreachable STUN server).
      const timer = setTimeout(done, timeoutMs);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function onConnectionState(c) {
    if (c.ended || !c.pc) return;
    const pc = c.pc;
    let state = pc.connectionState;
    if (state === undefined) {
      // Browsers without connectionState: derive it from the ICE state.
      const ice = pc.iceConnectionState;
      state = ice === "completed" ? "connected" : ice === "checking" ? "connecting" : ice;
    }
    if (state === "connected") {
      clearTimeout(c.timers.disconnect);
      c.timers.disconnect = null;
      if (voiceAgent.state !== "in-call") onConnected(c);
      else setStatus("In call — go ahead and talk", "live");
    } else if (state === "disconnected") {
      if (voiceAgent.state === "in-call" && !c.timers.disconnect) {
        setStatus("Connection unstable, reconnecting…", "busy");
        c.timers.disconnect = setTimeout(
          () => endCall(c, { error: "The connection was lost." }),
          DISCONNECT_GRACE_MS,
        );
      }
    } else if (state === "failed") {
      endCall(c, {
        error: voiceAgent.state === "in-call" ? "The connection was lost." : "Couldn't connect the audio. Check your network or firewall.",
      });
    } else if (state === "closed") {
      endCall(c, { note: "The call was closed" });
    }
  }

  function onConnected(c) {
    clearTimeout(c.timers.connect);
    c.startedAt = performance.now();
    setState("in-call");
    setStatus("In call — go ahead and talk", "live");
    ui.timer.hidden = false;
    ui.timer.textContent = "00:00";
    c.timers.clock = setInterval(() => {
      ui.timer.textContent = formatDuration(performance.now() - c.startedAt);
    }, 500);
    addSystemLine(`Call started · voice ${ui.voice.value || "default"}`);
  }

  function onRemoteTrack(c, e) {
    if (c.ended || e.track.kind !== "audio") return;
    const stream = (e.streams && e.streams[0]) || new MediaStream([e.track]);
    ui.audio.srcObject = stream;
    const playing = ui.audio.play();
    if (playing && playing.catch) {
      playing.catch(() => {
        if (!c.ended) setStatus("Audio is blocked by the browser: click the page to hear the agent", "error");
        document.addEventListener("click", () => ui.audio.play().catch(() => {}), { once: true });
      });
    }
    c.remoteAnalyser = makeAnalyser(c, stream);
  }

  function hangUp() {
    if (call) endCall(call, { note: "Call ended" });
  }

  function endCall(c, { error = null, note = "Call ended" } = {}) {
    if (c.ended) return;
    c.ended = true;
    const duration = c.startedAt ? performance.now() - c.startedAt : 0;
    if (c.callId) sendHangUp(c.callId);
    cleanUp(c);
    if (call === c) call = null;

    for (const entry of c.turns.values()) {
      entry.el.classList.remove("live");
    }
    if (c.callerLive) finishCallerLine(c, null);

    stickyStatus = true;
    if (error) {
      setState("error");
      setStatus(error, "error");
      addSystemLine(duration ? `Call dropped after ${formatDuration(duration)}` : "Call failed");
    } else {
      setState("ended");
      setStatus(duration ? `${note} · ${formatDuration(duration)}` : note, "info");
      if (duration) addSystemLine(`${note} · ${formatDuration(duration)}`);
    }
    // Refresh the server's state (loading, busy) for the next call.
    scheduleHealth(1000);
  }

  function sendHangUp(callId) {
    if (!callId) return;
    fetch(`/calls/${encodeURIComponent(callId)}`, { method: "DELETE", keepalive: true }).catch(() => {});
  }

  function cleanUp(c) {
    for (const t of Object.values(c.timers)) {
      clearTimeout(t);
      clearInterval(t);
    }
    cancelAnimationFrame(c.raf);
    if (c.dc) {
      c.dc.onmessage = null;
      c.dc.onclose = null;
      try {
        c.dc.close();
      } catch {
        /* already closed */
      }
    }
    if (c.pc) {
      c.pc.ontrack = null;
      c.pc.onconnectionstatechange = null;
      c.pc.oniceconnectionstatechange = null;
      try {
        c.pc.close();
      } catch {
        /* already closed */
      }
    }
    if (c.stream) for (const track of c.stream.getTracks()) track.stop();
    if (c.audioCtx && c.audioCtx.state !== "closed") c.audioCtx.close().catch(() => {});
    ui.audio.srcObject = null;
    ui.timer.hidden = true;
    setMicLevel(0);
    setAgentLevel(0, false);
  }

  window.addEventListener("pagehide", () => {
    if (call && call.callId) sendHangUp(call.callId);
  });

  // ---------------------------------------------------------------- audio meters

  function makeAnalyser(c, stream) {
    if (!c.audioCtx) return null;
    try {
      if (c.audioCtx.state === "suspended") c.audioCtx.resume().catch(() => {});
      const source = c.audioCtx.createMediaStreamSource(stream);
      const analyser = c.audioCtx.createAnalyser();
      analyser.fftSize = 1024;
      analyser.smoothingTimeConstant = 0.3;
      source.connect(analyser); // not to the destination: the <audio> element plays it
      return { analyser, buf: new Float32Array(analyser.fftSize), smooth: 0 };
    } catch {
      return null;
    }
  }

  // Loudness of the analyser's current window, 0..1 on a -60..0 dBFS scale.
  function level(a) {
    if (!a) return 0;
    a.analyser.getFloatTimeDomainData(a.buf);
    let sum = 0;
    for (let i = 0; i < a.buf.length; i++) sum += a.buf[i] * a.buf[i];
    const rms = Math.sqrt(sum / a.buf.length);
    const db = 20 * Math.log10(rms + 1e-9);
    const value = Math.min(1, Math.max(0, (db + 60) / 60));
    a.smooth = value > a.smooth ? value : a.smooth * 0.85 + value * 0.15;
    return a.smooth;
  }

  function startMeters(c) {
    c.micAnalyser = makeAnalyser(c, c.stream);
    const tick = () => {
      if (c.ended) return;
      setMicLevel(level(c.micAnalyser));
      const agent = level(c.remoteAnalyser);
      const now = performance.now();
      if (agent > 0.3) c.speakingUntil = now + 350; // hold briefly between words
      setAgentLevel(agent, now < c.speakingUntil);
      c.raf = requestAnimationFrame(tick);
    };
    c.raf = requestAnimationFrame(tick);
  }

  function setMicLevel(v) {
    const pct = Math.round(v * 100);
    ui.micLevel.style.width = `${pct}%`;
    ui.micMeter.setAttribute("aria-valuenow", String(pct));
  }

  let agentSpeaking = false;
  function setAgentLevel(v, speaking) {
    ui.orb.style.setProperty("--level", v.toFixed(3));
    if (speaking === agentSpeaking) return;
    agentSpeaking = speaking;
    renderActivity();
  }

  function renderActivity() {
    const state = voiceAgent.state;
    ui.orb.dataset.speaking = String(agentSpeaking);
    ui.activity.classList.toggle("speaking", agentSpeaking);
    ui.activity.textContent = agentSpeaking
      ? "Agent speaking"
      : state === "in-call"
        ? "Agent listening"
        : state === "connecting"
          ? "Calling…"
          : "Not in a call";
  }

  // ---------------------------------------------------------------- events and transcript

  function onEvent(c, raw) {
    if (c.ended || typeof raw !== "string") return;
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object" || typeof msg.type !== "string") return;
    voiceAgent.events.push(msg);
    if (voiceAgent.events.length > MAX_EVENTS_KEPT) voiceAgent.events.shift();
    switch (msg.type) {
      case "speech_started":
        startCallerLine(c);
        break;
      case "speech_stopped":
        finishCallerLine(c, msg.duration_s);
        break;
      case "transcript": // the caller's words, written after the reply began
        onTranscript(c, msg);
        break;
      case "reply_text":
        onReplyText(c, msg);
        break;
      case "interrupted":
        onInterrupted(c, msg);
        break;
      case "paused": // the caller made a sound: the agent holds its reply
        onPaused(c, msg);
        break;
      case "resumed": // it was short (a cough, an "mhm"): the agent plays on
        onResumed(c, msg);
        break;
      case "turn":
        onTurn(c, msg);
        break;
      case "turn_failed":
        onTurnFailed(c, msg);
        break;
      case "hangup": // the agent ended the call (the caller stayed silent)
        endCall(c, { note: msg.reason === "idle caller" ? "The agent hung up: no answer" : "The agent hung up" });
        break;
      default:
        break; // unknown events are ignored
    }
  }

  function clearPlaceholder() {
    const empty = ui.transcript.querySelector(".empty");
    if (empty) empty.remove();
  }

  // The transcript follows the conversation unless the user scrolled up to read.
  let followTranscript = true;
  ui.transcript.addEventListener("scroll", () => {
    const list = ui.transcript;
    followTranscript = list.scrollHeight - list.scrollTop - list.clientHeight < 30;
  });

  function followConversation() {
    if (followTranscript) ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function appendLine(el) {
    clearPlaceholder();
    ui.transcript.appendChild(el);
    followConversation();
  }

  function makeLine(kind, who) {
    const li = document.createElement("li");
    li.className = `msg ${kind}`;
    if (who) {
      const w = document.createElement("span");
      w.className = "who";
      w.textContent = who;
      li.appendChild(w);
    }
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    li.appendChild(bubble);
    const meta = document.createElement("div");
    meta.className = "meta";
    li.appendChild(meta);
    return { el: li, bubble, meta };
  }

  function addTag(meta, cls, text) {
    const tag = document.createElement("span");
    tag.className = `tag ${cls}`;
    tag.textContent = text;
    meta.appendChild(tag);
    return tag;
  }

  function addSystemLine(text) {
    const line = makeLine("system", null);
    line.bubble.textContent = text;
    appendLine(line.el);
  }

  function startCallerLine(c) {
    if (c.callerLive) return;
    const line = makeLine("caller live", "You");
    line.el.dataset.role = "caller";
    line.bubble.textContent = "Speaking…";
    appendLine(line.el);
    c.callerLive = line;
  }

  function finishCallerLine(c, durationS) {
    let line = c.callerLive;
    if (!line) {
      if (typeof durationS !== "number") return;
      line = makeLine("caller", "You");
      line.el.dataset.role = "caller";
      appendLine(line.el);
    }
    line.el.classList.remove("live");
    line.bubble.textContent =
      typeof durationS === "number" && isFinite(durationS) ? `Spoke for ${durationS.toFixed(1)} s` : "Spoke";
    if (typeof durationS === "number") line.el.dataset.durationS = String(durationS);
    c.callerLive = null;
    c.callerUnanswered.push(line);
    followConversation();
  }

  // A reply begins: the caller lines before it are its turn's (several, when the caller
  // paused and went on before any reply was heard).
  function claimCallerLines(c, turn) {
    for (const line of c.callerUnanswered) line.el.dataset.turn = String(turn);
    c.callerUnanswered = [];
  }

  function onTranscript(c, msg) {
    if (typeof msg.text !== "string" || msg.turn === undefined) return;
    const lines = ui.transcript.querySelectorAll(`li[data-role="caller"][data-turn="${CSS.escape(String(msg.turn))}"]`);
    let target = lines.length ? lines[lines.length - 1] : null;
    if (!target) return; // its lines were cleared
    for (const el of lines) if (el !== target) el.remove(); // one turn, one line of words
    const bubble = target.querySelector(".bubble");
    bubble.textContent = msg.text.trim() || "(no words heard)";
    target.classList.add("transcribed");
    const meta = target.querySelector(".meta");
    if (meta && !meta.querySelector(".tag.spoke")) {
      const d = Number(target.dataset.durationS);
      addTag(meta, "spoke", isFinite(d) && d > 0 ? `${d.toFixed(1)} s` : "spoken").title = "How long you spoke";
    }
    followConversation();
  }

  function agentLine(c, turn) {
    const key = String(turn);
    let entry = c.turns.get(key);
    if (!entry || !entry.el.isConnected) {
      const line = makeLine("agent live", "Agent");
      line.el.dataset.role = "agent";
      line.el.dataset.turn = key;
      entry = { ...line, text: "", heard: null, interrupted: false, done: false };
      c.turns.set(key, entry);
      claimCallerLines(c, turn);
      appendLine(line.el);
    }
    return entry;
  }

  function renderAgent(entry) {
    const b = entry.bubble;
    b.replaceChildren();
    const text = entry.text;
    if (entry.interrupted && entry.heard !== null) {
      const heard = entry.heard.trim();
      if (heard && text.startsWith(heard)) {
        b.append(document.createTextNode(heard));
        const rest = text.slice(heard.length);
        if (rest.trim()) {
          const span = document.createElement("span");
          span.className = "unheard";
          span.textContent = rest;
          b.append(span);
        }
        return;
      }
    }
    b.textContent = text || (entry.done ? "(no reply)" : "…");
  }

  function renderAgentAndFollow(entry) {
    renderAgent(entry);
    followConversation();
  }

  function onReplyText(c, msg) {
    if (typeof msg.text !== "string") return;
    const entry = agentLine(c, msg.turn);
    const piece = msg.text.trim();
    if (!piece) return;
    entry.text = entry.text ? `${entry.text} ${piece}` : piece;
    renderAgentAndFollow(entry);
  }

  function onPaused(c, msg) {
    const entry = agentLine(c, msg.turn);
    if (!entry.el.querySelector(".tag.paused")) addTag(entry.meta, "paused", "Paused");
    renderAgentAndFollow(entry);
  }

  function onResumed(c, msg) {
    const entry = agentLine(c, msg.turn);
    const tag = entry.el.querySelector(".tag.paused");
    if (tag) tag.remove();
    entry.resumes = (entry.resumes || 0) + 1;
    let resumed = entry.el.querySelector(".tag.resumed");
    if (!resumed) resumed = addTag(entry.meta, "resumed", "");
    resumed.textContent = entry.resumes > 1 ? `Resumed ×${entry.resumes}` : "Resumed";
    renderAgentAndFollow(entry);
  }

  function onInterrupted(c, msg) {
    const pausedTag = agentLine(c, msg.turn).el.querySelector(".tag.paused");
    if (pausedTag) pausedTag.remove();
    const entry = agentLine(c, msg.turn);
    entry.interrupted = true;
    entry.heard = typeof msg.heard === "string" ? msg.heard : "";
    entry.el.classList.add("interrupted");
    entry.el.classList.remove("live");
    if (!entry.el.querySelector(".tag.interrupted")) addTag(entry.meta, "interrupted", "Interrupted");
    const heard = entry.heard.trim();
    if (!(heard && entry.text.startsWith(heard))) {
      let h = entry.el.querySelector(".heard");
      if (!h) {
        h = document.createElement("span");
        h.className = "heard";
        entry.el.insertBefore(h, entry.meta);
      }
      h.textContent = heard ? `You heard: “${heard}”` : "Interrupted before you heard anything";
    }
    renderAgentAndFollow(entry);
  }

  function onTurn(c, msg) {
    const entry = agentLine(c, msg.turn);
    entry.done = true;
    entry.el.classList.remove("live");
    if (!entry.text && typeof msg.reply === "string") entry.text = msg.reply.trim();
    renderAgent(entry);
    const lat = msg.latency_ms && typeof msg.latency_ms === "object" ? msg.latency_ms : null;
    const ms = lat ? num(lat.first_frame_queued) : null;
    if (ms !== null && !entry.el.querySelector(".tag.latency")) {
      const tag = addTag(entry.meta, "latency", `${Math.round(ms)} ms`);
      tag.title = "From the end of your speech to the agent's first audio";
    }
    followConversation();
    if (lat) showLatency(c, lat);
  }

  function onTurnFailed(c, msg) {
    const entry = agentLine(c, msg.turn);
    entry.done = true;
    entry.el.classList.remove("live");
    renderAgent(entry);
    if (!entry.text) entry.bubble.textContent = "Sorry, the agent couldn't answer that.";
    const tag = addTag(entry.meta, "failed", "Failed");
    if (typeof msg.error === "string") tag.title = msg.error;
    followConversation();
  }

  function num(v) {
    return typeof v === "number" && isFinite(v) ? v : null;
  }

  function showLatency(c, lat) {
    const total = num(lat.first_frame_queued);
    const v = ui.latencyValue;
    v.classList.remove("good", "ok", "slow");
    if (total === null) {
      v.textContent = "—";
    } else {
      v.textContent = `${Math.round(total)} ms`;
      v.classList.add(total < 800 ? "good" : total < 1500 ? "ok" : "slow");
      c.latencies.push(total);
      const sorted = [...c.latencies].sort((a, b) => a - b);
      const mid = sorted.length >> 1;
      const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
      ui.latencyMedian.textContent =
        c.latencies.length > 1 ? `median ${Math.round(median)} ms · ${c.latencies.length} turns` : "";
    }
    for (const dd of ui.breakdown.querySelectorAll("dd[data-key]")) {
      const x = num(lat[dd.dataset.key]);
      dd.textContent = x === null ? "—" : `${Math.round(x)} ms`;
    }
  }

  ui.clear.addEventListener("click", () => {
    ui.transcript.replaceChildren();
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "The conversation will appear here.";
    ui.transcript.appendChild(li);
    if (call) {
      call.turns.clear();
      call.callerLive = null;
      call.callerUnanswered = [];
    }
  });

  function formatDuration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
  }

  // ---------------------------------------------------------------- start

  setState("idle");
  checkHealth();
})();
