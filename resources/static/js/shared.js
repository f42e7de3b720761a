// Lemonade web UI: helpers shared by the chat tab and the model manager.
// Plain browser JS, no build step. Everything hangs off window.Lemonade.
(function () {
  'use strict';

  // All API calls are same-origin; the server registers each route under /api/v1.
  const API_BASE = '/api/v1';
  const HEALTH_POLL_MS = 5000;

  // ---------- API key ----------
  // A server started with LEMONADE_API_KEY answers 401 without it. The user types the key once; it is
  // kept in this origin's localStorage, which no page of another origin can read, and sent as
  // `Authorization: Bearer`. The server never writes the key into a page (any local process could
  // fetch the page, and a DNS-rebinding page could read it).
  const KEY_STORAGE = 'lemonade.apiKey';
  function apiKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ''; } catch (_) { return ''; }
  }
  function setApiKey(key) {
    try {
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
    } catch (_) { /* storage disabled: the key lasts for this page only */ }
  }
  function authHeaders(headers) {
    const out = Object.assign({}, headers || {});
    const key = apiKey();
    if (key) out['Authorization'] = 'Bearer ' + key;
    return out;
  }
  // Called with every response: a 401 opens the key dialog once.
  function noteStatus(status) {
    if (status === 401) askForKey(apiKey() ? 'The server refused this API key.' : 'This server needs an API key.');
  }
  function askForKey(reason) {
    const dialog = document.getElementById('key-dialog');
    if (!dialog || dialog.open) return;
    const why = document.getElementById('key-reason');
    if (why) why.textContent = reason || '';
    const input = document.getElementById('key-input');
    if (input) input.value = '';
    dialog.showModal();
    if (input) input.focus();
  }
  function setupKeyDialog() {
    const dialog = document.getElementById('key-dialog');
    if (!dialog) return;
    const form = dialog.querySelector('form');
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const value = document.getElementById('key-input').value.trim();
      if (!value) return;
      setApiKey(value);
      dialog.close();
      location.reload();   // every panel starts again with the key
    });
    document.getElementById('key-forget').addEventListener('click', () => {
      setApiKey('');
      dialog.close();
      location.reload();
    });
    document.getElementById('key-cancel').addEventListener('click', () => dialog.close());
    const button = document.getElementById('key-btn');
    if (button) button.addEventListener('click', () => askForKey(apiKey() ? 'A key is stored for this page.' : ''));
  }

  const events = new EventTarget();

  function emit(name, detail) { events.dispatchEvent(new CustomEvent(name, { detail })); }
  function on(name, fn) { events.addEventListener(name, (e) => fn(e.detail)); }

  // Pull a human-readable message out of any of the server's error shapes:
  // {"error":"msg"}, {"error":{"message":"msg",...}} or plain text.
  function errorMessage(body, status) {
    if (body && typeof body === 'object' && body.error !== undefined) {
      const err = body.error;
      if (typeof err === 'string') return err;
      if (err && typeof err.message === 'string') return err.message;
      return JSON.stringify(err);
    }
    if (typeof body === 'string' && body.trim()) return body.trim();
    return 'HTTP ' + status;
  }

  async function readBody(resp) {
    const text = await resp.text();
    if (!text) return null;
    try { return JSON.parse(text); } catch (_) { return text; }
  }

  // fetch + JSON with errors turned into exceptions. `body` may be an object
  // (sent as JSON) or a FormData (sent as multipart, the browser sets the boundary).
  async function api(path, { method = 'GET', body, signal } = {}) {
    const init = { method, signal, headers: authHeaders() };
    if (body instanceof FormData) {
      init.body = body;
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
    const resp = await fetch(API_BASE + path, init);
    noteStatus(resp.status);
    const data = await readBody(resp);
    if (!resp.ok) {
      const e = new Error(errorMessage(data, resp.status));
      e.status = resp.status;
      throw e;
    }
    return data;
  }

  // Tiny DOM builder: el('button', {class: 'x', onclick: fn}, 'text', otherNode)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
      else if (k === 'class') node.className = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // A deliberately small Markdown subset, built with DOM nodes (never innerHTML),
  // so model output can't inject markup: fenced code, inline code, **bold**,
  // *italic*, paragraphs and line breaks.
  function renderMarkdown(target, text) {
    const frag = document.createDocumentFragment();
    const parts = text.split(/^```/m);
    parts.forEach((part, i) => {
      if (i % 2 === 1) {
        const nl = part.indexOf('\n');
        const lang = nl >= 0 ? part.slice(0, nl).trim() : '';
        const code = nl >= 0 ? part.slice(nl + 1) : '';
        const codeNode = el('code', lang ? { 'data-lang': lang } : {}, code.replace(/\n$/, ''));
        frag.append(el('pre', {}, codeNode));
        return;
      }
      for (const para of part.split(/\n{2,}/)) {
        if (!para.trim()) continue;
        const p = el('p');
        appendInline(p, para.replace(/^\n+|\n+$/g, ''));
        frag.append(p);
      }
    });
    target.replaceChildren(frag);
  }

  function appendInline(parent, text) {
    const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*|\n)/g;
    let last = 0;
    for (const m of text.matchAll(re)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      const tok = m[0];
      if (tok === '\n') parent.append(el('br'));
      else if (tok.startsWith('`')) parent.append(el('code', {}, tok.slice(1, -1)));
      else if (tok.startsWith('**')) parent.append(el('strong', {}, tok.slice(2, -2)));
      else parent.append(el('em', {}, tok.slice(1, -1)));
      last = m.index + tok.length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  // ---------- server health / status line ----------
  const health = { online: false, modelLoaded: null, checkpointLoaded: null };
  let healthTimer = null;

  async function refreshHealth() {
    try {
      const h = await api('/health');
      health.online = true;
      health.modelLoaded = h.model_loaded || null;
      health.checkpointLoaded = h.checkpoint_loaded || null;
    } catch (_) {
      health.online = false;
      health.modelLoaded = null;
      health.checkpointLoaded = null;
    }
    renderStatus();
    emit('health', { ...health });
    return health;
  }

  let statusOverride = null;
  // Show a transient message (e.g. "Loading X…") instead of the health line.
  function setBusyStatus(text) { statusOverride = text; renderStatus(); }

  function renderStatus() {
    const box = document.getElementById('server-status');
    const label = document.getElementById('server-status-text');
    if (!box || !label) return;
    box.classList.toggle('online', health.online);
    box.classList.toggle('offline', !health.online);
    if (statusOverride) label.textContent = statusOverride;
    else if (!health.online) label.textContent = 'Server unreachable';
    else if (health.modelLoaded) label.textContent = 'Loaded: ' + health.modelLoaded;
    else label.textContent = 'No model loaded';
    box.title = health.checkpointLoaded ? 'Checkpoint: ' + health.checkpointLoaded : '';
  }

  function startHealthPolling() {
    if (healthTimer) return;
    refreshHealth();
    healthTimer = setInterval(() => { if (!document.hidden) refreshHealth(); }, HEALTH_POLL_MS);
  }

  // ---------- tabs (hash routing: #llm-chat, #model-management) ----------
  const TABS = { 'llm-chat': 'tab-chat', 'model-management': 'tab-models' };
  const DEFAULT_TAB = 'llm-chat';

  function showTab() {
    const wanted = location.hash.replace(/^#/, '');
    const current = TABS[wanted] ? wanted : DEFAULT_TAB;
    for (const [panelId, tabId] of Object.entries(TABS)) {
      const active = panelId === current;
      const panel = document.getElementById(panelId);
      const tab = document.getElementById(tabId);
      if (panel) panel.hidden = !active;
      if (tab) {
        tab.setAttribute('aria-selected', String(active));
        tab.tabIndex = active ? 0 : -1;
      }
    }
    emit('tab', current);
  }

  // ---------- catalogue helpers ----------
  const serverModels = () => window.SERVER_MODELS || {};
  function serverPort() {
    const meta = document.querySelector('meta[name="lemonade-port"]');
    const n = meta ? parseInt(meta.content, 10) : NaN;
    return Number.isFinite(n) ? n : null;
  }
  function modelLabels(name, entry) {
    const labels = (entry && entry.labels) || (serverModels()[name] || {}).labels || [];
    return Array.isArray(labels) ? labels : [];
  }
  // Start with "?model=NAME" (set by `lemonade run`) if present.
  function requestedModel() {
    return new URLSearchParams(location.search).get('model');
  }

  window.Lemonade = {
    API_BASE, api, authHeaders, noteStatus, el, on, emit, errorMessage, renderMarkdown,
    health, refreshHealth, setBusyStatus, startHealthPolling,
    serverModels, serverPort, modelLabels, requestedModel,
  };

  window.addEventListener('hashchange', showTab);
  document.addEventListener('DOMContentLoaded', () => {
    setupKeyDialog();
    showTab();
    startHealthPolling();
  });
})();
