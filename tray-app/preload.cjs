// The dashboard window's preload (sandboxed: CommonJS, only `electron`'s renderer modules).
// It exposes one frozen object so the page can tell it runs inside the tray app; nothing else
// (no ipcRenderer, no Node) reaches the page.
const { contextBridge } = require('electron')

contextBridge.exposeInMainWorld('garageTray', Object.freeze({ embedded: true }))
