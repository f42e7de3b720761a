// Lemonade web UI: the chat tab. Streams /api/v1/chat/completions over SSE
// using fetch + ReadableStream and renders each delta as it arrives.
(function () {
  'use strict';
  const L = window.Lemonade;
  const { api, el } = L;

  const SETTINGS_KEY = 'lemonade.chat.settings';
  const SETTINGS = [
    // [input id, request field, parser]
    ['set-temperature', 'temperature', parseFloat],
    ['set-top-p', 'top_p', parseFloat],
    ['set-top-k', 'top_k', (v) => parseInt(v, 10)],
    ['set-repeat-penalty', 'repeat_penalty', parseFloat],
    ['set-max-tokens', 'max_tokens', (v) => parseInt(v, 10)],
  ];

  const $ = (id) => document.getElementById(id);
  const ui = {};
  const state = {
    messages: [],          // OpenAI-style history sent with every request
    models: [],            // entries of GET /api/v1/models (downloaded models)
    controller: null,      // AbortController of the stream in flight
    loading: false,        // a /load triggered by the picker is in flight
    pendingImages: [],     // data: URLs attached to the next message
    userPicked: false,     // the user chose a model in the picker
  };

  // ---------------- model picker ----------------
  async function loadModelList() {
    let data;
    try {
      data = await api('/models');
    } catch (e) {
      ui.select.replaceChildren(el('option', { value: '' }, 'Could not list models'));
      ui.hint.textContent = e.message;
      return;
    }
    state.models = (data && data.data) || [];
    const previous = ui.select.value;
    const wanted = previous || L.requestedModel() || L.health.modelLoaded;
    ui.select.replaceChildren();
    if (!state.models.length) {
      ui.select.append(el('option', { value: '' }, 'No downloaded models'));
      ui.hint.textContent = 'Download one in the Models tab.';
    } else {
      ui.hint.textContent = '';
      for (const m of state.models) ui.select.append(el('option', { value: m.id }, m.id));
      const ids = state.models.map((m) => m.id);
      ui.select.value = ids.includes(wanted) ? wanted : ids[0];
    }
    ui.select.dataset.ready = 'true';
    updateModelControls();
    updateSendState();
  }

  function selectedModel() { return ui.select.value || null; }

  function isVision(name) { return L.modelLabels(name).includes('vision'); }
  function isReasoning(name) { return L.modelLabels(name).includes('reasoning'); }

  // Until the user picks something, follow the server's loaded model.
  function followLoadedModel(h) {
    if (state.userPicked || L.requestedModel() || !h.modelLoaded || state.controller) return;
    if (state.models.some((m) => m.id === h.modelLoaded) && ui.select.value !== h.modelLoaded) {
      ui.select.value = h.modelLoaded;
      updateModelControls();
    }
  }

  async function onModelPicked() {
    state.userPicked = true;
    const name = selectedModel();
    updateModelControls();
    if (!name || name === L.health.modelLoaded) return;
    state.loading = true;
    updateSendState();
    L.setBusyStatus('Loading ' + name + '…');
    try {
      await api('/load', { method: 'POST', body: { model_name: name } });
    } catch (e) {
      addNotice('Could not load ' + name + ': ' + e.message);
    } finally {
      state.loading = false;
      L.setBusyStatus(null);
      await L.refreshHealth();
      updateSendState();
    }
  }

  // ---------------- settings ----------------
  function restoreSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || '{}') || {}; } catch (_) { saved = {}; }
    for (const [id] of SETTINGS) $(id).value = saved[id] !== undefined ? saved[id] : '';
    $('set-thinking').checked = saved['set-thinking'] !== false;
  }

  function saveSettings() {
    const out = {};
    for (const [id] of SETTINGS) if ($(id).value !== '') out[id] = $(id).value;
    out['set-thinking'] = $('set-thinking').checked;
    try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(out)); } catch (_) { /* private mode */ }
  }

  function requestOptions() {
    const opts = {};
    for (const [id, field, parse] of SETTINGS) {
      const raw = $(id).value;
      if (raw === '') continue;
      const v = parse(raw);
      if (Number.isFinite(v)) opts[field] = v;
    }
    // Only for reasoning models: the server turns enable_thinking:false into a
    // "/no_think" prefix on the last user message, which other models would echo.
    if (isReasoning(selectedModel()) && !$('set-thinking').checked) opts.enable_thinking = false;
    return opts;
  }

  // ---------------- message rendering ----------------
  function clearEmptyHint() { const h = $('chat-empty'); if (h) h.remove(); }

  function isNearBottom() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }
  function scrollToBottom() { ui.messages.scrollTop = ui.messages.scrollHeight; }

  function addUserMessage(text, images) {
    clearEmptyHint();
    const node = el('div', { class: 'message user' }, el('span', { class: 'who' }, 'You'), text);
    for (const url of images) node.append(el('img', { class: 'attachment', src: url, alt: 'attached image' }));
    ui.messages.append(node);
    scrollToBottom();
  }

  function addNotice(text) {
    clearEmptyHint();
    ui.messages.append(el('div', { class: 'message error', role: 'alert' }, text));
    scrollToBottom();
  }

  // One assistant bubble; collects content and reasoning deltas and renders
  // them at most once per animation frame.
  function createAssistantMessage(model) {
    clearEmptyHint();
    const content = el('div', { class: 'content' });
    const thinkText = el('div', { class: 'thinking-text' });
    const thinking = el('details', { class: 'thinking', hidden: true }, el('summary', {}, 'Thinking…'), thinkText);
    const meta = el('div', { class: 'meta', hidden: true });
    const node = el('div', { class: 'message assistant', dataset: { state: 'streaming' } },
      el('span', { class: 'who' }, model || 'Assistant'), thinking, content, meta);
    ui.messages.append(node);
    scrollToBottom();

    let raw = '';          // content as streamed (may contain <think> tags)
    let reasoning = '';    // reasoning_content deltas
    let scheduled = false;

    function split() {
      // Models that inline their reasoning as <think>…</think> in the content.
      let text = raw;
      let inline = '';
      const open = text.indexOf('<think>');
      if (open >= 0) {
        const close = text.indexOf('</think>', open);
        inline = close >= 0 ? text.slice(open + 7, close) : text.slice(open + 7);
        text = text.slice(0, open) + (close >= 0 ? text.slice(close + 8) : '');
      }
      return { answer: text.replace(/^\s+/, ''), thoughts: (reasoning + inline).trim() };
    }

    function render() {
      scheduled = false;
      const stick = isNearBottom();
      const { answer, thoughts } = split();
      L.renderMarkdown(content, answer);
      thinking.hidden = !thoughts;
      thinkText.textContent = thoughts;
      if (stick) scrollToBottom();
    }

    function schedule() {
      if (scheduled) return;
      scheduled = true;
      requestAnimationFrame(render);
    }

    return {
      node,
      addContent(t) { raw += t; schedule(); },
      addReasoning(t) { reasoning += t; schedule(); },
      answer() { return split().answer; },
      finish(stateName, info) {
        render();
        node.dataset.state = stateName;
        thinking.querySelector('summary').textContent = 'Thoughts';
        if (info) { meta.textContent = info; meta.hidden = false; }
        if (stateName === 'done' && !split().answer && !split().thoughts) {
          content.append(el('em', {}, '(empty response)'));
        }
      },
    };
  }

  // ---------------- SSE streaming ----------------
  // Handles one SSE event block or bare line. Returns true on [DONE].
  function handleEvent(block, bubble, stats) {
    const dataLines = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('data:')) dataLines.push(line.slice(5).replace(/^ /, ''));
      else if (line.startsWith('{')) dataLines.push(line);   // un-prefixed JSON error line
      // ':' comments and other fields are ignored
    }
    if (!dataLines.length) return false;
    const data = dataLines.join('\n');
    if (data.trim() === '[DONE]') return true;
    let frame;
    try { frame = JSON.parse(data); } catch (_) { return false; }
    if (frame.error) throw new Error(L.errorMessage(frame, 200));
    const choice = (frame.choices || [])[0];
    const delta = choice && (choice.delta || choice.message);
    if (delta) {
      if (typeof delta.reasoning_content === 'string') bubble.addReasoning(delta.reasoning_content);
      if (typeof delta.content === 'string') bubble.addContent(delta.content);
    }
    if (frame.timings) stats.timings = frame.timings;
    if (frame.usage) stats.usage = frame.usage;
    return false;
  }

  async function readStream(resp, bubble, stats) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (handleEvent(block, bubble, stats)) { reader.cancel().catch(() => {}); return; }
      }
    }
    buf += decoder.decode();
    if (buf.trim()) handleEvent(buf, bubble, stats);
  }

  function statsLine(stats) {
    const t = stats.timings;
    if (t && t.predicted_n) {
      return t.predicted_n + ' tokens · ' + (t.predicted_per_second || 0).toFixed(1) + ' tok/s';
    }
    const u = stats.usage;
    if (u && u.completion_tokens) return u.completion_tokens + ' tokens';
    return '';
  }

  async function send() {
    const text = ui.input.value.trim();
    const model = selectedModel();
    if ((!text && !state.pendingImages.length) || state.controller || state.loading) return;
    if (!model) { addNotice('No model selected. Download one in the Models tab.'); return; }

    const images = state.pendingImages.splice(0);
    renderAttachments();
    const content = images.length
      ? [{ type: 'text', text }, ...images.map((url) => ({ type: 'image_url', image_url: { url } }))]
      : text;
    state.messages.push({ role: 'user', content });
    addUserMessage(text, images);
    ui.input.value = '';

    const bubble = createAssistantMessage(model);
    const stats = {};
    state.controller = new AbortController();
    updateSendState();
    if (model !== L.health.modelLoaded) L.setBusyStatus('Loading ' + model + '…');

    let outcome = 'done';
    try {
      const resp = await fetch(L.API_BASE + '/chat/completions', {
        method: 'POST',
        headers: L.authHeaders({ 'Content-Type': 'application/json' }),
        body: JSON.stringify({ model, messages: state.messages, stream: true, ...requestOptions() }),
        signal: state.controller.signal,
      });
      L.setBusyStatus(null);
      L.noteStatus(resp.status);
      const type = resp.headers.get('Content-Type') || '';
      if (!resp.ok || !type.includes('text/event-stream')) {
        const body = await resp.text();
        let parsed = body;
        try { parsed = JSON.parse(body); } catch (_) { /* keep text */ }
        if (resp.ok && parsed && parsed.choices) {      // server answered without streaming
          handleEvent('data: ' + JSON.stringify(parsed), bubble, stats);
        } else {
          throw new Error(L.errorMessage(parsed, resp.status));
        }
      } else {
        await readStream(resp, bubble, stats);
      }
    } catch (e) {
      if (e.name === 'AbortError') outcome = 'stopped';
      else { outcome = 'error'; addNotice('Chat failed: ' + e.message); }
    } finally {
      L.setBusyStatus(null);
      state.controller = null;
      const answer = bubble.answer();
      bubble.finish(outcome, outcome === 'stopped' ? 'Stopped' : statsLine(stats));
      if (answer) state.messages.push({ role: 'assistant', content: answer });
      else if (outcome !== 'done') state.messages.pop();   // drop the unanswered turn
      updateSendState();
      L.refreshHealth();
      ui.input.focus();
    }
  }

  function stop() {
    if (!state.controller) return;
    state.controller.abort();
    // Same as upstream's UI: a fire-and-forget halt. The server may not have
    // the route (404); the abort above is what actually ends the stream.
    fetch(L.API_BASE + '/halt', { headers: L.authHeaders() }).catch(() => {});
  }

  function clearChat() {
    if (state.controller) stop();
    state.messages = [];
    ui.messages.replaceChildren(el('p', { class: 'empty-hint', id: 'chat-empty' }, 'Pick a model and say something.'));
    ui.input.focus();
  }

  function updateSendState() {
    const busy = !!state.controller;
    ui.send.disabled = busy || state.loading || !selectedModel();
    ui.stop.disabled = !busy;
    ui.select.disabled = busy || state.loading;
  }

  // ---------------- image attachments (vision models) ----------------
  function updateModelControls() {
    for (const node of document.querySelectorAll('.reasoning-only')) node.hidden = !isReasoning(selectedModel());
    const vision = isVision(selectedModel());
    $('attach-label').hidden = !vision;
    if (!vision && state.pendingImages.length) { state.pendingImages = []; renderAttachments(); }
  }

  function renderAttachments() {
    const box = $('attachments');
    box.replaceChildren(...state.pendingImages.map((url, i) => el('figure', {},
      el('img', { src: url, alt: 'attachment ' + (i + 1) }),
      el('button', { type: 'button', class: 'danger', 'aria-label': 'Remove attachment ' + (i + 1),
        onclick: () => { state.pendingImages.splice(i, 1); renderAttachments(); } }, '×'))));
    box.hidden = !state.pendingImages.length;
  }

  function readImages(files) {
    for (const f of files) {
      const r = new FileReader();
      r.onload = () => { state.pendingImages.push(r.result); renderAttachments(); };
      r.readAsDataURL(f);
    }
  }

  // ---------------- wiring ----------------
  function init() {
    ui.select = $('model-select');
    ui.hint = $('model-select-hint');
    ui.messages = $('chat-messages');
    ui.input = $('chat-input');
    ui.send = $('send-btn');
    ui.stop = $('stop-btn');

    restoreSettings();
    for (const [id] of SETTINGS) $(id).addEventListener('change', saveSettings);
    $('set-thinking').addEventListener('change', saveSettings);
    $('settings-reset').addEventListener('click', () => {
      try { localStorage.removeItem(SETTINGS_KEY); } catch (_) { /* ignore */ }
      restoreSettings();
    });

    $('chat-form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
    ui.input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    ui.stop.addEventListener('click', stop);
    $('clear-btn').addEventListener('click', clearChat);
    ui.select.addEventListener('change', onModelPicked);
    $('image-input').addEventListener('change', (e) => { readImages(e.target.files); e.target.value = ''; });

    updateSendState();
    loadModelList();
  }

  L.on('models-changed', loadModelList);
  L.on('health', followLoadedModel);
  L.on('tab', (tab) => { if (tab === 'llm-chat' && ui.input) ui.input.focus(); });
  document.addEventListener('DOMContentLoaded', init);
})();
