// The node's dashboard: no build step, no library, no request leaves this origin.
// The token comes from the page's fragment (#token=...), which browsers never send to the server;
// every call, the event stream included, carries it in the Authorization header.

const tokenStorageKey = 'garage-control-token'
const chartWindowMs = 3 * 60_000
const reconnectMaxMs = 10_000
/** The server sends a heartbeat every 15 s: a stream silent for longer is dead. */
const streamSilenceMs = 45_000

const $ = (id) => document.getElementById(id)

const stateLabels = {
  stopped: 'Stopped',
  starting: 'Starting',
  serving: 'Serving',
  paused: 'Paused',
  draining: 'Draining',
  stopping: 'Stopping',
  error: 'Error',
}
const dayNames = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat']
const numberFields = ['vramCapMiB', 'maxGpuTemperatureC', 'idleOnlyMinutes', 'resumeAfterSeconds']
const settingFields = ['games', 'schedule', ...numberFields, 'pauseOnBattery']

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `HTTP ${status}`)
    this.name = 'ApiError'
    this.status = status
    this.code = body?.error?.code ?? null
    this.field = body?.error?.field ?? null
    this.fields = body?.error?.fields ?? null
  }
}

function takeToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash)
  if (match != null) {
    const token = decodeURIComponent(match[1])
    try {
      sessionStorage.setItem(tokenStorageKey, token)
    } catch {}
    // Keep the token out of the address bar, history and screenshots.
    history.replaceState(null, '', location.pathname + location.search)
    return token
  }
  try {
    return sessionStorage.getItem(tokenStorageKey)
  } catch {
    return null
  }
}

const token = takeToken()

function showAuthError(text) {
  const banner = $('auth-error')
  banner.textContent = text
  banner.hidden = false
  setConnection('not connected', false)
}

function setConnection(text, live) {
  const el = $('connection')
  el.textContent = text
  el.dataset.live = live ? 'yes' : 'no'
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    cache: 'no-store',
    headers: {
      authorization: `Bearer ${token}`,
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  })
  if (res.status === 204) return null
  const data = await res.json().catch(() => null)
  if (!res.ok) {
    if (res.status === 401) refused()
    throw new ApiError(res.status, data)
  }
  return data
}

function refused() {
  showAuthError(
    'The node refused this page’s access token. Open the dashboard again from the Garage tray app (the node may have a new token).',
  )
}

// --- Status ---

let lastStatus = null

function formatNumber(n) {
  return Number(n).toLocaleString()
}

function formatDuration(seconds) {
  const d = Math.floor(seconds / 86_400)
  const h = Math.floor((seconds % 86_400) / 3_600)
  const m = Math.floor((seconds % 3_600) / 60)
  if (d > 0) return `${d} d ${h} h`
  if (h > 0) return `${h} h ${m} min`
  return m > 0 ? `${m} min` : `${seconds} s`
}

function describeGpu(gpu) {
  if (gpu == null) return 'none (CPU)'
  const parts = [gpu.name, `${formatNumber(Math.round(gpu.vramMiB / 102.4) / 10)} GiB`]
  if (gpu.utilizationPct != null) parts.push(`${gpu.utilizationPct}% busy`)
  if (gpu.temperatureC != null) parts.push(`${gpu.temperatureC} °C`)
  return parts.join(' · ')
}

function renderStatus(status) {
  lastStatus = status
  const state = $('state')
  state.textContent = stateLabels[status.state] ?? status.state
  state.dataset.state = status.state
  const reason = []
  if (status.reason != null) reason.push(status.reason)
  if (status.pausedUntil != null)
    reason.push(
      `until ${new Date(status.pausedUntil).toLocaleString([], { weekday: 'short', hour: '2-digit', minute: '2-digit' })}`,
    )
  $('reason').textContent = reason.join(' · ')
  $('gpu').textContent = describeGpu(status.gpu)
  $('model').textContent = status.model ?? '–'
  const engine = status.engine
  const notes = engine == null ? [] : [...(engine.failed ?? []).map((f) => `${f.engine} failed: ${f.reason}`)]
  if (engine?.detail != null && notes.length === 0) notes.push(engine.detail)
  $('engine').textContent = engine != null ? [engine.kind, ...notes].join(' · ') : '–'
  $('region').textContent = status.region ?? '–'
  $('uptime').textContent = formatDuration(status.uptimeSeconds)
  // The head holds the node back: its answers failed integrity checks (docs/integrity.md).
  const integrity = $('integrity')
  integrity.hidden = status.integrity == null
  integrity.textContent =
    status.integrity == null
      ? ''
      : status.integrity.state === 'quarantined'
        ? `Quarantined by the region: ${status.integrity.reason}. No requests come and credits are held back; restart Garage to appeal.`
        : `Appealing: ${status.integrity.reason}.`
  renderNumbers(status)
  $('pause').disabled = ['stopped', 'stopping', 'draining'].includes(status.state)
  $('resume').disabled = status.state !== 'paused'
}

function renderNumbers(numbers) {
  $('tps').textContent = formatNumber(numbers.tokensPerSecond)
  $('tokens-today').textContent = formatNumber(numbers.tokensToday)
  $('credits-today').textContent = formatNumber(numbers.creditsToday)
}

// --- Chart ---

const points = []

function addPoint(at, value) {
  // Keep time order even if a point arrives late (a reconnect may replay one).
  let i = points.length
  while (i > 0 && points[i - 1].t > at) i--
  points.splice(i, 0, { t: at, v: value })
  const cutoff = points[points.length - 1].t - chartWindowMs
  while (points.length > 0 && points[0].t < cutoff) points.shift()
  scheduleDraw()
}

let drawPending = false
function scheduleDraw() {
  if (drawPending) return
  drawPending = true
  requestAnimationFrame(() => {
    drawPending = false
    drawChart()
  })
}

/** 1, 2, 5, 10, 20, 50, ...: the smallest at or above n. */
function niceCeiling(n) {
  if (n <= 0) return 1
  const step = 10 ** Math.floor(Math.log10(n))
  for (const m of [1, 2, 5, 10]) if (m * step >= n) return m * step
  return 10 * step
}

function drawChart() {
  const canvas = $('chart')
  const ratio = window.devicePixelRatio || 1
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio))
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio))
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width
    canvas.height = height
  }
  const ctx = canvas.getContext('2d')
  const css = getComputedStyle(document.documentElement)
  ctx.clearRect(0, 0, width, height)
  const top = 16 * ratio
  const bottom = height - 4 * ratio
  const max = niceCeiling(Math.max(...points.map((p) => p.v), 1))
  const y = (v) => bottom - (v / max) * (bottom - top)
  ctx.strokeStyle = css.getPropertyValue('--chart-grid')
  ctx.fillStyle = css.getPropertyValue('--muted')
  ctx.lineWidth = ratio
  ctx.font = `${11 * ratio}px system-ui, sans-serif`
  for (const v of [0, max / 2, max]) {
    ctx.beginPath()
    ctx.moveTo(0, Math.round(y(v)) + 0.5)
    ctx.lineTo(width, Math.round(y(v)) + 0.5)
    ctx.stroke()
  }
  ctx.fillText(`${formatNumber(max)} tok/s`, 4 * ratio, top - 4 * ratio)
  if (points.length === 0) return
  const now = points[points.length - 1].t
  const x = (t) => width - ((now - t) / chartWindowMs) * width
  ctx.beginPath()
  ctx.moveTo(x(points[0].t), y(points[0].v))
  for (const p of points) ctx.lineTo(x(p.t), y(p.v))
  ctx.strokeStyle = css.getPropertyValue('--chart-line')
  ctx.lineWidth = 2 * ratio
  ctx.lineJoin = 'round'
  ctx.stroke()
  ctx.lineTo(x(now), bottom)
  ctx.lineTo(x(points[0].t), bottom)
  ctx.closePath()
  ctx.fillStyle = css.getPropertyValue('--chart-fill')
  ctx.fill()
  canvas.setAttribute(
    'aria-label',
    `Tokens per second over the last 3 minutes; now ${formatNumber(points[points.length - 1].v)}`,
  )
}

// --- Events (fetch streaming, so the token stays in a header) ---

function handleEvent(type, data) {
  if (type === 'state') {
    renderStatus(data)
  } else if (type === 'stats') {
    renderNumbers(data)
    addPoint(Date.parse(data.at) || Date.now(), data.tokensPerSecond)
    if (lastStatus != null) Object.assign(lastStatus, data)
  }
}

function parseBlock(block) {
  let type = 'message'
  const data = []
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue
    const colon = line.indexOf(':')
    const field = colon < 0 ? line : line.slice(0, colon)
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '')
    if (field === 'event') type = value
    else if (field === 'data') data.push(value)
  }
  if (data.length > 0) handleEvent(type, JSON.parse(data.join('\n')))
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function followEvents() {
  let backoffMs = 500
  for (;;) {
    const controller = new AbortController()
    let lastData = Date.now()
    const watchdog = setInterval(() => {
      if (Date.now() - lastData > streamSilenceMs) controller.abort()
    }, 5_000)
    try {
      const res = await fetch('/events', {
        cache: 'no-store',
        headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' },
        signal: controller.signal,
      })
      if (res.status === 401) {
        refused()
        return
      }
      if (!res.ok || res.body == null) throw new Error(`HTTP ${res.status}`)
      setConnection('live', true)
      backoffMs = 500
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader()
      let buffer = ''
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        lastData = Date.now()
        buffer += value.replace(/\r\n?/g, '\n')
        let end = buffer.indexOf('\n\n')
        while (end >= 0) {
          parseBlock(buffer.slice(0, end))
          buffer = buffer.slice(end + 2)
          end = buffer.indexOf('\n\n')
        }
      }
    } catch {
      // Reconnect below.
    } finally {
      clearInterval(watchdog)
    }
    setConnection('reconnecting…', false)
    await delay(backoffMs)
    backoffMs = Math.min(backoffMs * 2, reconnectMaxMs)
  }
}

// --- Pause and resume ---

async function act(button, work) {
  const error = $('action-error')
  error.textContent = ''
  button.disabled = true
  try {
    renderStatus(await work())
  } catch (err) {
    error.textContent = err.message
    if (lastStatus != null) renderStatus(lastStatus)
  }
}

// --- Settings ---

function formatDays(days) {
  const sorted = [...new Set(days)].sort((a, b) => a - b)
  if (sorted.length === 7) return 'daily'
  const runs = []
  let i = 0
  while (i < sorted.length) {
    let j = i
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++
    const from = dayNames[sorted[i]]
    const to = dayNames[sorted[j]]
    runs.push(j - i >= 2 ? `${from}-${to}` : j > i ? `${from},${to}` : from)
    i = j + 1
  }
  return runs.join(',')
}

function formatSchedule(schedule) {
  if (schedule.length === 0) return 'always'
  return schedule.map((w) => `${formatDays(w.days)} ${w.startHour}-${w.endHour}`).join('; ')
}

function fillSettings(settings) {
  $('games').value = settings.games.join('\n')
  $('schedule').value = formatSchedule(settings.schedule)
  for (const name of numberFields) $(name).value = settings[name] == null ? '' : String(settings[name])
  $('pauseOnBattery').checked = settings.pauseOnBattery
}

/** Empty → null; a number → the number; anything else goes as typed, so the server names the field. */
function numberValue(text) {
  const t = text.trim()
  if (t === '') return null
  const n = Number(t)
  return Number.isFinite(n) ? n : t
}

function readSettings() {
  return {
    games: $('games')
      .value.split(/[\n,]/)
      .map((g) => g.trim())
      .filter((g) => g !== ''),
    schedule: $('schedule').value,
    vramCapMiB: numberValue($('vramCapMiB').value),
    maxGpuTemperatureC: numberValue($('maxGpuTemperatureC').value),
    idleOnlyMinutes: numberValue($('idleOnlyMinutes').value),
    // Empty means "the default" only for nullable fields; resumeAfterSeconds must be given.
    resumeAfterSeconds: numberValue($('resumeAfterSeconds').value) ?? '',
    pauseOnBattery: $('pauseOnBattery').checked,
  }
}

function clearFieldErrors() {
  for (const name of settingFields) {
    $(`${name}-error`).textContent = ''
    $(name).removeAttribute('aria-invalid')
  }
}

function showFieldErrors(err) {
  const fields = err.fields ?? (err.field != null ? { [err.field]: err.message } : {})
  let first = null
  for (const [name, message] of Object.entries(fields)) {
    const input = $(name)
    const slot = $(`${name}-error`)
    if (input == null || slot == null) continue
    slot.textContent = message
    input.setAttribute('aria-invalid', 'true')
    first ??= input
  }
  first?.focus()
  return first != null
}

async function saveSettings(event) {
  event.preventDefault()
  const message = $('settings-message')
  const save = $('save')
  clearFieldErrors()
  message.textContent = 'Saving…'
  save.disabled = true
  try {
    fillSettings(await api('PUT', '/settings', readSettings()))
    message.textContent = 'Saved.'
  } catch (err) {
    const shown = err instanceof ApiError && showFieldErrors(err)
    message.textContent = shown ? 'Not saved: fix the fields marked above.' : `Not saved: ${err.message}`
  } finally {
    save.disabled = false
  }
}

// --- Start ---

function start() {
  if (token == null || token === '') {
    showAuthError(
      'This page needs the node’s access token. Open it from the Garage tray app, or add #token=… (the contents of control.token in the data folder) to the address.',
    )
    return
  }
  $('pause').addEventListener('click', (e) =>
    act(e.currentTarget, () => api('POST', '/pause', { minutes: 60 })),
  )
  $('resume').addEventListener('click', (e) => act(e.currentTarget, () => api('POST', '/resume', {})))
  $('settings').addEventListener('submit', saveSettings)
  window.addEventListener('resize', scheduleDraw)
  scheduleDraw()
  api('GET', '/status')
    .then(renderStatus)
    .catch(() => {})
  api('GET', '/settings')
    .then(fillSettings)
    .catch((err) => {
      $('settings-message').textContent = `Cannot load the settings: ${err.message}`
    })
  followEvents()
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start)
else start()
