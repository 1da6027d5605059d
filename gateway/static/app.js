/* Chorus viewer: live comments over WebSocket (subprotocol chorus.json.v1). No frameworks. */
(function () {
  "use strict";

  var MAX_LEN = 500;          // characters (code points) per comment
  var MAX_DOM = 500;          // comments kept in the list
  var MAX_SEEN = 5000;        // ids remembered for de-duplication
  var BACKOFF_MAX_MS = 15000;
  var LS_TOKEN = "chorus.token", LS_NAME = "chorus.name", LS_UID = "chorus.uid";

  var $ = function (id) { return document.getElementById(id); };
  var el = {
    list: $("comments"), empty: $("empty"), pill: $("new-pill"), status: $("status"),
    viewers: $("viewer-count"), pin: $("pin"), banner: $("banner"), reactions: $("reactions"),
    input: $("comment-input"), send: $("send"), counter: $("counter"), error: $("error"),
    form: $("comment-form"), streamForm: $("stream-form"), streamInput: $("stream-input"),
    loginForm: $("login-form"), nameInput: $("name-input"), login: $("login"),
    tokenBox: $("token-box"), tokenForm: $("token-form"), tokenInput: $("token-input"),
    signedIn: $("signed-in"), meName: $("me-name"), logout: $("logout")
  };

  var stream = new URLSearchParams(location.search).get("stream") || "lobby";
  var state = {
    ws: null, live: false, attempt: 0, timer: null, stopped: false,
    epoch: null, offset: null, seen: new Set(), unseen: 0, stick: true,
    pending: null, nonceSeq: 0, slow: 0, keepRatio: 1, skipped: 0
  };

  function store(key, val) {   // localStorage may throw (private mode): then nothing is remembered
    try { if (val) localStorage.setItem(key, val); else localStorage.removeItem(key); } catch (e) { /* ignore */ }
  }
  function load(key) { try { return localStorage.getItem(key) || ""; } catch (e) { return ""; } }

  /* ---------- connection ---------- */
  function setStatus(kind, text) { el.status.dataset.state = kind; el.status.textContent = text; }

  function wsUrl() {
    var proto = location.protocol === "https:" ? "wss:" : "ws:";
    var token = load(LS_TOKEN);  // anonymous viewers connect without one (read-only)
    return proto + "//" + location.host + "/ws?stream=" + encodeURIComponent(stream) +
      (token ? "&access_token=" + encodeURIComponent(token) : "");
  }

  function connect() {
    clearTimeout(state.timer);
    if (location.protocol !== "http:" && location.protocol !== "https:") {
      setStatus("offline", "offline: open via the gateway");
      return;
    }
    setStatus(state.attempt ? "reconnecting" : "connecting", state.attempt ? "reconnecting…" : "connecting…");
    var ws;
    try { ws = new WebSocket(wsUrl(), ["chorus.json.v1"]); } catch (e) {
      setStatus("offline", "offline: " + e.message);
      return;
    }
    state.ws = ws;
    ws.onopen = function () {
      if (ws !== state.ws) return;
      if (state.epoch != null && state.offset != null) {
        ws.send(JSON.stringify({ t: "resume", epoch: state.epoch, offset: state.offset }));
      }
    };
    ws.onmessage = function (ev) {
      if (ws !== state.ws) return;
      var msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg && typeof msg.t === "string" && handlers.hasOwnProperty(msg.t)) handlers[msg.t](msg);
    };
    ws.onclose = function (ev) {
      if (ws !== state.ws) return;
      state.ws = null;
      state.live = false;
      state.pending = null;   // an unacknowledged post may be lost; its text is still in the box
      updateSend();
      if (ev.code >= 4500 && ev.code <= 4999) {
        state.stopped = true;
        setStatus("offline", "disconnected: " + (ev.reason || "closed by server (" + ev.code + ")"));
        return;
      }
      if (!state.stopped) scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    var delay = Math.min(1000 * Math.pow(2, state.attempt), BACKOFF_MAX_MS);
    state.attempt++;
    setStatus("reconnecting", "reconnecting in " + Math.round(delay / 1000) + " s…");
    state.timer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    var old = state.ws;
    state.ws = null;
    state.stopped = false;
    state.attempt = 0;
    if (old) old.close(1000, "reconnect");
    connect();
  }

  // The newest position seen, for `resume`: recovered batches can arrive after newer live ones.
  function track(m) {
    if (m.epoch == null || m.offset == null) return;
    if (m.epoch !== state.epoch || state.offset == null || m.offset > state.offset) {
      state.epoch = m.epoch;
      state.offset = m.offset;
    }
  }

  /* ---------- server messages ---------- */
  var handlers = {
    welcome: function (m) {
      state.live = true;
      state.attempt = 0;
      setStatus("live", "live");
      track(m);
      renderPin(m.pin || null);
      if (m.viewers) handlers.viewers(m.viewers);
      if (m.mode) handlers.mode(m.mode);
      if (m.reactions) handlers.reactions({ totals: m.reactions });
      addComments(m.recent || []);
      updateSend();
    },
    batch: function (m) { track(m); addComments(m.comments || []); },
    ack: function (m) {
      if (state.pending && m.nonce === state.pending.nonce) {
        if (el.input.value === state.pending.text) { el.input.value = ""; autosize(); }
        state.pending = null;
        showError("");
        updateSend();
      }
    },
    error: function (m) {
      var text = m.reason || m.code || "something went wrong";
      if (m.retry_after_ms) text += " (try again in " + Math.ceil(m.retry_after_ms / 1000) + " s)";
      showError(text);
      if (state.pending && m.nonce === state.pending.nonce) {
        state.pending = null;   // the text stays in the box so it can be re-sent
        updateSend();
      }
    },
    "delete": function (m) {
      var li = el.list.querySelector('li.comment[data-id="' + CSS.escape(String(m.id)) + '"]');
      if (li) li.remove();
      if (el.pin.dataset.id === String(m.id)) renderPin(null);
      updateEmpty();
    },
    pin: function (m) { renderPin(m.comment || null); },
    unpin: function () { renderPin(null); },
    viewers: function (m) {
      if (typeof m.now !== "number") return;
      el.viewers.hidden = false;
      el.viewers.textContent = m.now.toLocaleString() + " watching";
      el.viewers.title = typeof m.unique === "number" ? m.unique.toLocaleString() + " unique viewers" : "";
    },
    mode: function (m) { state.slow = Number(m.slow_mode_seconds) || 0; renderBanner(); },
    throttle: function (m) {
      var r = Number(m.keep_ratio);
      state.keepRatio = r > 0 && r < 1 ? r : 1;
      if (state.keepRatio === 1) state.skipped = 0;
      renderBanner();
    },
    skipped: function (m) { state.skipped += Number(m.count) || 0; renderBanner(); },
    reactions: function (m) {
      var totals = m.totals || {};
      el.reactions.textContent = "";
      Object.keys(totals).forEach(function (k) {
        var chip = document.createElement("span");
        chip.className = "reaction";
        chip.textContent = k + " " + Number(totals[k]).toLocaleString();
        el.reactions.appendChild(chip);
      });
      el.reactions.hidden = !el.reactions.childElementCount;
    }
  };

  /* ---------- rendering ---------- */
  function atBottom() { return el.list.scrollHeight - el.list.scrollTop - el.list.clientHeight < 48; }

  function authorBlock(c, cls) {
    var frag = document.createDocumentFragment();
    var user = c.user || {};
    var name = document.createElement("span");
    name.className = cls;
    name.textContent = user.name || "anonymous";
    frag.appendChild(name);
    (Array.isArray(user.badges) ? user.badges : []).forEach(function (b) {
      var t = b && typeof b === "object" ? String(b.label || b.name || b.id || "") : String(b == null ? "" : b);
      if (!t) return;
      var chip = document.createElement("span");
      chip.className = "badge";
      chip.textContent = t;
      frag.appendChild(chip);
    });
    return frag;
  }

  function renderComment(c) {
    var li = document.createElement("li");
    li.className = "comment";
    li.dataset.id = String(c.id);
    var user = c.user || {};
    if (user.id != null && String(user.id) === load(LS_UID)) li.classList.add("mine");
    var meta = document.createElement("div");
    meta.className = "meta";
    meta.appendChild(authorBlock(c, "author"));
    var d = new Date(Number(c.ts));
    if (c.ts != null && !isNaN(d.getTime())) {
      var time = document.createElement("time");
      time.dateTime = d.toISOString();
      time.title = d.toLocaleString();
      time.textContent = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      meta.appendChild(time);
    }
    var text = document.createElement("p");
    text.className = "text";
    text.textContent = String(c.text == null ? "" : c.text);
    li.appendChild(meta);
    li.appendChild(text);
    return li;
  }

  function addComments(list) {
    if (!list.length) return;
    var frag = document.createDocumentFragment();
    var added = 0;
    list.forEach(function (c) {
      if (!c || c.id == null) return;
      var id = String(c.id);
      if (state.seen.has(id)) return;
      state.seen.add(id);
      frag.appendChild(renderComment(c));
      added++;
    });
    if (!added) return;
    el.list.appendChild(frag);
    while (el.list.childElementCount > MAX_DOM) el.list.firstElementChild.remove();
    if (state.seen.size > MAX_SEEN) {
      // Sets iterate in insertion order: forget the oldest ids.
      state.seen = new Set(Array.from(state.seen).slice(-MAX_SEEN / 2));
    }
    updateEmpty();
    if (state.stick) scrollToBottom();
    else { state.unseen += added; renderPill(); }
  }

  function scrollToBottom() { el.list.scrollTop = el.list.scrollHeight; state.unseen = 0; renderPill(); }

  function renderPill() {
    el.pill.hidden = state.unseen === 0;
    el.pill.textContent = state.unseen + " new ↓";
    el.pill.setAttribute("aria-label", state.unseen + " new comments, jump to newest");
  }

  function updateEmpty() { el.empty.hidden = el.list.childElementCount > 0; }

  function renderPin(c) {
    el.pin.hidden = !c;
    el.pin.dataset.id = c ? String(c.id) : "";
    var author = el.pin.querySelector(".pin-author");
    author.textContent = "";
    if (!c) { el.pin.querySelector(".pin-text").textContent = ""; return; }
    author.appendChild(authorBlock(c, "author"));
    el.pin.querySelector(".pin-text").textContent = String(c.text == null ? "" : c.text);
  }

  function renderBanner() {
    var parts = [];
    if (state.slow > 0) parts.push("Slow mode: one comment every " + state.slow + " s");
    if (state.keepRatio < 1) {
      var s = "Busy chat: showing 1 in " + Math.round(1 / state.keepRatio);
      if (state.skipped) s += " (" + state.skipped.toLocaleString() + " skipped)";
      parts.push(s);
    }
    el.banner.hidden = !parts.length;
    el.banner.textContent = parts.join(" · ");
  }

  function showError(text) { el.error.textContent = text; }

  /* ---------- composing ---------- */
  function updateSend() {
    var text = el.input.value;
    var n = Array.from(text).length;   // code points, not UTF-16 units
    var tooLong = n > MAX_LEN;
    el.counter.textContent = n + "/" + MAX_LEN;
    el.counter.classList.toggle("over", tooLong);
    el.counter.classList.toggle("near", !tooLong && n > MAX_LEN - 50);
    var token = load(LS_TOKEN);
    el.send.disabled = !token || !state.live || !!state.pending || !text.trim() || tooLong;
    el.send.textContent = state.pending ? "Sending…" : "Send";
    el.input.placeholder = token ? "Say something…" : "Sign in below to comment";
  }

  function autosize() {
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight + 2, 140) + "px";
  }

  function submitComment(ev) {
    ev.preventDefault();
    if (el.send.disabled || !state.ws) return;
    var nonce = "c" + Date.now().toString(36) + "-" + (++state.nonceSeq);
    state.pending = { nonce: nonce, text: el.input.value };
    showError("");
    state.ws.send(JSON.stringify({ t: "comment", text: el.input.value.trim(), nonce: nonce }));
    // Never leave the box locked if no ack or error arrives.
    setTimeout(function () {
      if (state.pending && state.pending.nonce === nonce) { state.pending = null; updateSend(); }
    }, 10000);
    updateSend();
  }

  /* ---------- account ---------- */
  function renderAccount() {
    var token = load(LS_TOKEN);
    el.signedIn.hidden = !token;
    el.loginForm.hidden = !!token;
    el.tokenBox.hidden = !!token;
    el.meName.textContent = load(LS_NAME) || "token user";
    if (!token && !el.nameInput.value) el.nameInput.value = load(LS_NAME);
    updateSend();
  }

  function signIn(token, name, uid) {
    store(LS_TOKEN, token); store(LS_NAME, name); store(LS_UID, uid);
    showError("");
    renderAccount();
    reconnectNow();
  }

  function devLogin(ev) {
    ev.preventDefault();
    var name = el.nameInput.value.trim();
    if (!name) { showError("Type a name first."); el.nameInput.focus(); return; }
    el.login.disabled = true;
    fetch("/dev/token?name=" + encodeURIComponent(name), { headers: { Accept: "application/json" } })
      .then(function (res) {
        if (res.status === 404) throw new Error("nologin");
        if (!res.ok) throw new Error("sign-in failed (HTTP " + res.status + ")");
        return res.json();
      })
      .then(function (data) {
        if (!data || !data.token) throw new Error("sign-in failed: no token returned");
        var user = data.user || {};
        signIn(data.token, user.name || name, user.id != null ? String(user.id) : "");
      })
      .catch(function (err) {
        if (err.message === "nologin") {
          showError("Posting needs a token: paste one below.");
          el.tokenBox.open = true;
          el.tokenInput.focus();
        } else {
          showError(err.message === "Failed to fetch" ? "sign-in failed: gateway unreachable" : err.message);
        }
      })
      .then(function () { el.login.disabled = false; });
  }

  /* ---------- wiring ---------- */
  el.streamInput.value = stream;
  el.streamForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var next = el.streamInput.value.trim();
    if (!next || next === stream) return;
    var params = new URLSearchParams(location.search);
    params.set("stream", next);
    location.search = params.toString();
  });

  el.form.addEventListener("submit", submitComment);
  el.input.addEventListener("input", function () { autosize(); updateSend(); });
  el.input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submitComment(ev);
  });

  el.list.addEventListener("scroll", function () {
    state.stick = atBottom();
    if (state.unseen && state.stick) { state.unseen = 0; renderPill(); }
  });
  // Banners and the pin bar change the list's height: stay pinned to the newest comment.
  if (window.ResizeObserver) {
    new ResizeObserver(function () { if (state.stick) el.list.scrollTop = el.list.scrollHeight; }).observe(el.list);
  }
  el.pill.addEventListener("click", scrollToBottom);

  el.loginForm.addEventListener("submit", devLogin);
  el.tokenForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var token = el.tokenInput.value.trim();
    if (!token) { showError("Paste a token first."); return; }
    el.tokenInput.value = "";
    signIn(token, el.nameInput.value.trim(), "");
  });
  el.logout.addEventListener("click", function () {
    store(LS_TOKEN, ""); store(LS_UID, "");
    renderAccount();
    reconnectNow();
  });

  document.title = "#" + stream + " — Chorus";
  renderAccount();
  updateEmpty();
  connect();
})();
