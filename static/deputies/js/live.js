// A websocket that reconnects with backoff and, while the socket keeps failing, also polls a REST
// endpoint until the socket is back. The caller keeps the cursor: the socket
// URL and the poll both ask for what comes after the last thing rendered, so nothing is missed and
// the caller drops anything it has already seen.

const FATAL = { 4401: "you are signed out; reload the page to log in again", 4403: "you no longer have access", 4404: "this is not available to you" };

export class FatalError extends Error {}

export class LiveConnection {
  constructor({ socketUrl, onFrame, poll, onState, pollInterval = 2000, maxSocketFailures = 3 }) {
    this.socketUrl = socketUrl; // () => string, called on every (re)connect so it carries the cursor
    this.onFrame = onFrame;
    this.poll = poll; // async () => boolean (true: more may be waiting, poll again at once)
    this.onState = onState || (() => {});
    this.pollInterval = pollInterval;
    this.maxSocketFailures = maxSocketFailures;
    this.failures = 0;
    this.pollFailures = 0;
    this.polling = false;
    this.stopped = false;
    this.ws = null;
  }

  start() {
    this.onState("connecting");
    if (typeof WebSocket === "undefined") this.startPolling();
    else this.connect();
    return this;
  }

  stop(state, detail) {
    this.stopped = true;
    this.polling = false;
    clearTimeout(this.timer);
    clearTimeout(this.pollTimer);
    if (this.ws) this.ws.close();
    if (state) this.onState(state, detail);
  }

  connect() {
    if (this.stopped) return;
    let ws;
    try {
      ws = new WebSocket(this.socketUrl());
    } catch (err) {
      this.socketClosed(false, 1006);
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.failures = 0;
      this.stopPolling();
      this.onState("live");
    };
    ws.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws === ws) this.ws = null;
      this.socketClosed(opened, event.code);
    };
  }

  socketClosed(opened, code) {
    if (this.stopped) return;
    if (FATAL[code]) {
      this.stop("error", FATAL[code]);
      return;
    }
    this.failures = opened ? 1 : this.failures + 1;
    // After a few failures, poll so the page stays fresh; keep trying the socket all the same
    // (a restarting server comes back), with a backoff capped at 15 s.
    if (this.failures >= this.maxSocketFailures) this.startPolling();
    else if (!this.polling) this.onState("reconnecting");
    const backoff = Math.min(15000, 500 * 2 ** (this.failures - 1)) * (0.75 + Math.random() / 2);
    this.timer = setTimeout(() => this.connect(), backoff);
  }

  startPolling() {
    if (this.polling || this.stopped || !this.poll) return;
    this.polling = true;
    this.onState("polling");
    const loop = async () => {
      if (!this.polling || this.stopped) return;
      let more = false;
      try {
        more = await this.poll();
        if (!this.polling || this.stopped) return; // the socket came back meanwhile
        if (this.pollFailures) this.onState("polling");
        this.pollFailures = 0;
      } catch (err) {
        if (!this.polling || this.stopped) return;
        if (err instanceof FatalError) {
          this.stop("error", err.message);
          return;
        }
        this.pollFailures += 1;
        this.onState("reconnecting");
      }
      const wait = more ? 0 : this.pollInterval * Math.min(8, 2 ** this.pollFailures);
      this.pollTimer = setTimeout(loop, wait);
    };
    loop();
  }

  stopPolling() {
    this.polling = false;
    clearTimeout(this.pollTimer);
  }
}

/** GET JSON; 401/403/404 are fatal (no point retrying), anything else is retried by the caller. */
export async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (response.status === 401 || response.status === 403) throw new FatalError("you are signed out or lost access; reload the page");
  if (response.status === 404) throw new FatalError("this is not available to you");
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}
